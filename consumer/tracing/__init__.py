"""Tracing: one OpenTelemetry span per event, under the trace its input's `traceparent` belongs to.

Off by default. On when the standard OpenTelemetry environment asks for it: OTEL_TRACES_EXPORTER
`otlp` (OTLP over HTTP/protobuf to OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
and/or `console`, unless OTEL_SDK_DISABLED=true. Everything else the SDK reads itself:
OTEL_SERVICE_NAME (default `diagram-consumer`), OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER,
OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ... (docs/tracing.md).

The spans of one event (messaging semantic conventions):

    process <input topic>   CONSUMER, child of the input's traceparent (a new trace without one)
      event "receive"       when the record entered the pipeline
      fetch, decode, prepare  on the fetch threads
      generate              its share of the model call, linked to the batch's span
      send <output topic>   PRODUCER, from produce to the broker's acknowledgement (or commit)
    generate batch          one per model call: its own trace, linked to each event's span

The result's and the dead letter's `traceparent` (and `tracestate`) name the event's span, so a
downstream consumer continues this trace; with tracing off they are the input's, unchanged.

The stages get a `Tracing`; `Tracing()` itself does nothing (tracing off), `OtelTracing` records.
Nothing here may fail an event: every error of the tracing code is logged (at most once a minute)
and swallowed.
"""

from consumer.tracing.base import NO_TRACING, Tracing
from consumer.tracing.otel import OtelTracing
from consumer.tracing.setup import exporter_names, tracing_from_environ

__all__ = ["NO_TRACING", "OtelTracing", "Tracing", "exporter_names", "tracing_from_environ"]
