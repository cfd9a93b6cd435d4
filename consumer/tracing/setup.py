"""Tracing from the standard OpenTelemetry environment (OTEL_TRACES_EXPORTER, ...)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Mapping

from consumer.settings import SERVICE_NAME, Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

from consumer.tracing.base import NO_TRACING, Tracing
from consumer.tracing.otel import OtelTracing

logger = logging.getLogger(__name__)


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; empty means tracing is off (OTEL_TRACES_EXPORTER
    unset, empty or `none`, or OTEL_SDK_DISABLED=true)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [name for name in names if name and name != "none"]


def tracing_from_environ(settings: Settings, environ: Mapping[str, str] | None = None) -> Tracing:
    """The service's tracing, as the standard OpenTelemetry variables ask; `NO_TRACING` when they ask
    for none, or when the SDK cannot be set up (logged: the service runs untraced)."""
    environ = os.environ if environ is None else environ
    names = exporter_names(environ)
    if not names:
        return NO_TRACING
    try:
        exporters = _exporters(names, environ)
        if not exporters:
            return NO_TRACING
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=_resource())
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    except Exception:  # noqa: BLE001 - tracing is never a reason not to serve
        logger.exception("cannot set up tracing (OTEL_TRACES_EXPORTER=%s): running untraced", ",".join(names))
        return NO_TRACING
    logger.info(
        "tracing on: %s, service.name=%s",
        ", ".join(f"{name} ({_destination(name, environ)})" for name in names),
        provider.resource.attributes.get("service.name"),
    )
    return OtelTracing(provider.get_tracer("consumer"), settings, provider)


def _exporters(names: list[str], environ: Mapping[str, str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )
            if protocol.strip().lower() != "http/protobuf":
                logger.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: only http/protobuf is installed; using it", protocol)
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        else:
            logger.warning("OTEL_TRACES_EXPORTER names %r, which this service does not have (otlp, console)", name)
    return exporters


def _resource() -> Any:
    from opentelemetry.sdk.resources import Resource

    from consumer.metrics import package_version

    resource = Resource.create({"service.version": package_version()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


def _destination(name: str, environ: Mapping[str, str]) -> str:
    if name != "otlp":
        return "stdout"
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces"
    )
