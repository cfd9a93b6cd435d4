"""`OtelTracing`: the spans of each event and batch, recorded with the OpenTelemetry SDK."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from consumer.settings import Settings
from consumer.stages.base import InputRecord, OutgoingRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

from consumer.tracing.base import (
    ERROR_LOG_INTERVAL_S,
    MAX_KEY_CHARS,
    MAX_OPEN_EVENTS,
    SHUTDOWN_FLUSH_MS,
    EventKey,
    T,
    Tracing,
)

logger = logging.getLogger(__name__)


@dataclass
class _Event:
    span: Span
    epoch: int


class OtelTracing(Tracing):
    """Tracing through an OpenTelemetry `Tracer` (the SDK's, or any other in tests)."""

    enabled = True

    def __init__(self, tracer: Tracer, settings: Settings, provider: TracerProvider | None = None) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer, self.settings, self.provider = tracer, settings, provider
        self._propagator = TraceContextTextMapPropagator()
        self._lock = threading.Lock()
        self._events: OrderedDict[EventKey, _Event] = OrderedDict()
        self._error_logged_at = -ERROR_LOG_INTERVAL_S

    # -- guarded calls ---------------------------------------------------------------------------
    def _guard(self, what: str, call: Callable[[], T]) -> T | None:
        """`call()`, or None when it raised: a tracing error is logged, never raised."""
        try:
            return call()
        except Exception:  # noqa: BLE001 - a span must never fail an event
            now = time.monotonic()
            if now - self._error_logged_at >= ERROR_LOG_INTERVAL_S:
                self._error_logged_at = now
                logger.warning("tracing failed (%s); the event goes on untraced", what, exc_info=True)
            return None

    def _span_of(self, record: InputRecord) -> Span | None:
        with self._lock:
            event = self._events.get((record.topic, record.partition, record.offset))
        return event.span if event is not None else None

    # -- the event's span ------------------------------------------------------------------------
    def received(self, record: InputRecord, epoch: int, event_id: str | None) -> None:
        self._guard("receive", lambda: self._receive(record, epoch, event_id))

    def _receive(self, record: InputRecord, epoch: int, event_id: str | None) -> None:
        from opentelemetry.trace import SpanKind

        carrier = {
            name.lower(): value.decode("latin-1")
            for name, value in record.headers
            if name.lower() in ("traceparent", "tracestate") and value is not None
        }
        parent = self._propagator.extract(carrier)
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": self.settings.kafka_group_id,
            "messaging.client.id": self.settings.client_id(),
            "messaging.message.body.size": len(record.value or b""),
        }
        key = _key_text(record.key)
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        if record.value is None:
            attributes["messaging.kafka.message.tombstone"] = True
        if event_id is not None:
            attributes["diagram.event.id"] = event_id
        span = self.tracer.start_span(
            f"process {record.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        receive: dict[str, Any] = {}
        if record.timestamp_ms is not None:
            receive["messaging.kafka.message.timestamp"] = record.timestamp_ms
        span.add_event("receive", receive)
        abandoned: list[Span] = []
        with self._lock:
            previous = self._events.pop((record.topic, record.partition, record.offset), None)
            if previous is not None:  # read again after a rewind: the first attempt never settled
                abandoned.append(previous.span)
            self._events[(record.topic, record.partition, record.offset)] = _Event(span, epoch)
            while len(self._events) > MAX_OPEN_EVENTS:
                abandoned.append(self._events.popitem(last=False)[1].span)
        for old in abandoned:
            _abandon(old)

    @contextmanager
    def step(self, record: InputRecord, name: str) -> Iterator[None]:
        span = self._guard(name, lambda: self._start_child(record, name))
        try:
            yield
        except BaseException as exc:
            if span is not None:
                self._guard(name, partial(_fail, span, exc))
            raise
        finally:
            if span is not None:
                self._guard(name, span.end)

    def _start_child(self, record: InputRecord, name: str, **kwargs: Any) -> Span | None:
        from opentelemetry import trace

        parent = self._span_of(record)
        if parent is None:
            return None
        return self.tracer.start_span(name, context=trace.set_span_in_context(parent), **kwargs)

    def generated(
        self, records: Sequence[InputRecord], started_ns: int, ended_ns: int, error: BaseException | None
    ) -> None:
        self._guard("generate", lambda: self._generated(records, started_ns, ended_ns, error))

    def _generated(
        self, records: Sequence[InputRecord], started_ns: int, ended_ns: int, error: BaseException | None
    ) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import Link

        spans = [span for span in map(self._span_of, records) if span is not None]
        batch = self.tracer.start_span(
            "generate batch",
            context=Context(),  # a root: one batch serves events of many traces
            links=[Link(span.get_span_context()) for span in spans],
            start_time=started_ns,
            attributes={"diagram.batch.size": len(records), "diagram.model": self.settings.base_model_id},
        )
        if error is not None:
            _fail(batch, error)
        batch.end(end_time=ended_ns)
        link = Link(batch.get_span_context())
        for record in records:
            child = self._start_child(
                record,
                "generate",
                links=[link],
                start_time=started_ns,
                attributes={"diagram.batch.size": len(records)},
            )
            if child is None:
                continue
            if error is not None:
                _fail(child, error)
            child.end(end_time=ended_ns)

    def trace_headers(self, record: InputRecord) -> dict[str, bytes] | None:
        return self._guard("inject", lambda: self._trace_headers(record))

    def _trace_headers(self, record: InputRecord) -> dict[str, bytes] | None:
        from opentelemetry import trace

        span = self._span_of(record)
        if span is None:
            return None  # not traced here (a span failed to start): the input's context travels on
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return {name: value.encode() for name, value in carrier.items()}

    def settled(self, record: OutgoingRecord, produced_at: float) -> None:
        self._guard("settle", lambda: self._settled(record, produced_at))

    def _settled(self, record: OutgoingRecord, produced_at: float) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        source = record.source
        with self._lock:
            event = self._events.get((source.topic, source.partition, source.offset))
            if event is None or event.epoch != record.epoch:
                return
            del self._events[(source.topic, source.partition, source.offset)]
        span = event.span
        produced_ns = time.time_ns() - int((time.monotonic() - produced_at) * 1e9)
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": record.topic,
        }
        key = _key_text(record.key)
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        send = self._start_child(
            source, f"send {record.topic}", kind=SpanKind.PRODUCER, start_time=produced_ns, attributes=attributes
        )
        if send is None:  # the event is no longer registered: start it under the span directly
            from opentelemetry import trace

            send = self.tracer.start_span(
                f"send {record.topic}",
                context=trace.set_span_in_context(span),
                kind=SpanKind.PRODUCER,
                start_time=produced_ns,
                attributes=attributes,
            )
        send.end()
        span.set_attribute("diagram.outcome", record.outcome)
        cache = record.log_fields.get("cache")
        if cache is not None:
            span.set_attribute("diagram.result_cache", str(cache))
        if record.outcome != "ok":
            headers = {name: value for name, value in record.headers or []}
            stage, reason = _text(headers.get("error.stage")), _text(headers.get("error.reason"))
            span.set_attribute("error.type", reason or "dead_lettered")
            if stage:
                span.set_attribute("diagram.error.stage", stage)
            span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {stage} failed ({reason})"))
        span.end()

    def shutdown(self) -> None:
        with self._lock:
            open_spans = [event.span for event in self._events.values()]
            self._events.clear()
        for span in open_spans:
            self._guard("shutdown", partial(_abandon, span))
        provider = self.provider
        if provider is not None:
            self._guard("flush", lambda: provider.force_flush(SHUTDOWN_FLUSH_MS))
            self._guard("shutdown", provider.shutdown)


def _key_text(key: bytes | None) -> str | None:
    """A message key as messaging.kafka.message.key: its UTF-8 text, None when it has none (not
    UTF-8, or too long to be a useful attribute)."""
    if key is None or len(key) > MAX_KEY_CHARS:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _fail(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error)
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, str(error)[:500]))


def _abandon(span: Span) -> None:
    """End the span of an event this replica never settled (its partition moved on)."""
    span.set_attribute("diagram.abandoned", True)
    span.end()


# -- set-up from the environment ------------------------------------------------------------------
