"""Tracing through the whole pipeline on in-memory clients, with the SDK's InMemorySpanExporter.

One span per event under the input's trace, its steps as children, linked to its batch's span; the
result's traceparent names the event's span; tracing off leaves the input's traceparent as it was; a
tracer that fails never fails an event. The same over OTLP/HTTP with the real service:
tests/integration/test_tracing.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from consumer import pipeline as pipeline_module
from consumer.engine.echo import EchoEngine
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.settings import Settings
from consumer.stages.delivery import at_least_once
from consumer.state import ServiceState
from consumer.tracing import NO_TRACING, OtelTracing, Tracing, exporter_names, tracing_from_environ
from tests.fakes import FakeConsumer, FakeProducer, PipelineThread, event_value, png_base64, wait_for

IN, OUT, DLQ = "diagram-events", "diagram-descriptions", "diagram-events-dlq"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr(pipeline_module, "fit_to_topic_limits", lambda config, topics, timeout=10.0: config)
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 0.05)


def settings(**overrides: Any) -> Settings:
    return Settings.from_environ(
        {},
        input_topic=IN,
        output_topic=OUT,
        dlq_topic=DLQ,
        kafka_group_id="tracing-test",
        batch_max_wait_ms=20,
        shutdown_timeout=5,
        **overrides,
    )


def run_pipeline(tracing: Tracing, records: list[tuple[bytes, dict[str, bytes]]], guarantee: str = "at_least_once"):
    """Events through a pipeline with `tracing`; returns the producer once every input is settled."""
    consumer = FakeConsumer(partitions={IN: 1})
    producer = FakeProducer(group_offsets=consumer.committed_offsets)
    engine = EchoEngine()
    pipeline = Pipeline(
        settings(processing_guarantee=guarantee),
        engine,
        engine.load(),
        8,
        Metrics(),
        ServiceState(model="echo"),
        consumer_factory=consumer.factory,
        producer_factory=producer.factory,
        tracing=tracing,
    )
    for offset, (value, headers) in enumerate(records):
        consumer.append(IN, 0, value, key=f"k-{offset}", headers=list(headers.items()))
    thread = PipelineThread(pipeline).start()
    try:
        wait_for(
            lambda: (
                len(producer.records_in(OUT)) + len(producer.records_in(DLQ)) == len(records)
                and consumer.committed_offsets.get((IN, 0)) == len(records)
            ),
            10,
            "every input settled and committed",
        )
    finally:
        thread.stop(10)
    return producer


def in_memory() -> tuple[OtelTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider.get_tracer("test"), settings(), provider), exporter


def headers_of(message) -> dict[str, bytes]:
    return {name: value for name, value in message.headers() or []}


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_each_event_is_a_span_under_its_inputs_trace_linked_to_its_batch(guarantee):
    tracing, exporter = in_memory()
    producer = run_pipeline(
        tracing,
        [(event_value(f"e-{n}", {"base64": png_base64(n)}), {"traceparent": TRACEPARENT.encode()}) for n in range(3)],
        guarantee,
    )
    spans = exporter.get_finished_spans()
    events = by_name(spans, f"process {IN}")
    assert len(events) == 3
    for span in events:
        assert span.kind == SpanKind.CONSUMER
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
        attributes = span.attributes or {}
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.destination.name"] == IN
        assert attributes["messaging.consumer.group.name"] == "tracing-test"
        assert attributes["messaging.kafka.message.key"] == f"k-{attributes['messaging.kafka.offset']}"
        assert attributes["diagram.outcome"] == "ok" and attributes["diagram.result_cache"] == "off"
        assert [event.name for event in span.events] == ["receive"]
        children = {child.name for child in spans if child.parent and child.parent.span_id == span.context.span_id}
        assert children == {"fetch", "decode", "prepare", "generate", f"send {OUT}"}
    batches = by_name(spans, "generate batch")
    assert batches and all(batch.parent is None for batch in batches)
    linked = {link.context.span_id for batch in batches for link in batch.links}
    assert linked == {span.context.span_id for span in events}
    for generate in by_name(spans, "generate"):
        assert [link.context.span_id for link in generate.links][0] in {b.context.span_id for b in batches}
    # The result's traceparent names its event's span, in the input's trace.
    span_ids = {format(span.context.span_id, "016x") for span in events}
    for message in producer.records_in(OUT):
        version, trace_id, span_id, flags = headers_of(message)["traceparent"].decode().split("-")
        assert (version, trace_id) == ("00", TRACE_ID) and span_id in span_ids and int(flags, 16) & 1  # sampled


def test_an_event_without_a_traceparent_starts_a_trace_its_result_carries():
    tracing, exporter = in_memory()
    producer = run_pipeline(tracing, [(event_value("e-0"), {})])
    (event,) = by_name(exporter.get_finished_spans(), f"process {IN}")
    assert event.parent is None
    traceparent = headers_of(producer.records_in(OUT)[0])["traceparent"].decode()
    assert traceparent.startswith(f"00-{event.context.trace_id:032x}-{event.context.span_id:016x}-")


def test_a_dead_letter_is_traced_as_an_error_and_carries_the_event_span():
    tracing, exporter = in_memory()
    producer = run_pipeline(tracing, [(b"not json", {"traceparent": TRACEPARENT.encode(), "baggage": b"tenant=a"})])
    (event,) = by_name(exporter.get_finished_spans(), f"process {IN}")
    assert event.status.status_code == StatusCode.ERROR
    assert (event.attributes or {})["error.type"] == "not_json"
    assert (event.attributes or {})["diagram.error.stage"] == "parse"
    headers = headers_of(producer.records_in(DLQ)[0])
    assert headers["traceparent"].decode() == f"00-{TRACE_ID}-{event.context.span_id:016x}-01"
    assert headers["baggage"] == b"tenant=a"  # baggage travels as it came


def test_tracing_off_copies_the_inputs_traceparent_unchanged():
    producer = run_pipeline(NO_TRACING, [(event_value("e-0"), {"traceparent": TRACEPARENT.encode()})])
    assert headers_of(producer.records_in(OUT)[0])["traceparent"] == TRACEPARENT.encode()


class BrokenTracer:
    """A tracer whose every call raises: tracing must never fail an event."""

    def start_span(self, *args: Any, **kwargs: Any):
        raise RuntimeError("the tracer is broken")


def test_a_failing_tracer_fails_no_event_and_leaves_the_traceparent(caplog):
    tracing = OtelTracing(BrokenTracer(), settings())  # type: ignore[arg-type]
    producer = run_pipeline(tracing, [(event_value(f"e-{n}"), {"traceparent": TRACEPARENT.encode()}) for n in range(2)])
    assert len(producer.records_in(OUT)) == 2 and producer.records_in(DLQ) == []
    assert headers_of(producer.records_in(OUT)[0])["traceparent"] == TRACEPARENT.encode()
    assert "tracing failed" in caplog.text


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": ""}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ["otlp"]),
    ],
)
def test_which_environment_turns_tracing_on(environ, names):
    assert exporter_names(environ) == names
    tracing = tracing_from_environ(settings(), environ)
    assert tracing.enabled == bool(names)
    tracing.shutdown()


def test_the_service_name_defaults_to_diagram_consumer(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    tracing = tracing_from_environ(settings(), {"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(tracing, OtelTracing) and tracing.provider is not None
    assert tracing.provider.resource.attributes["service.name"] == "diagram-consumer"
    tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "diagrams-eu")
    tracing = tracing_from_environ(settings(), {"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(tracing, OtelTracing) and tracing.provider is not None
    assert tracing.provider.resource.attributes["service.name"] == "diagrams-eu"
    tracing.shutdown()
