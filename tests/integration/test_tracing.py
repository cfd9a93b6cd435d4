"""Tracing end to end: `python -m consumer run` (ENGINE=echo) on the real broker exports its spans over
OTLP/HTTP to a receiver on loopback, and they form one trace per event under the input's trace id."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fakes import png_base64
from tests.support import ServiceRunner, read_records

pytestmark = pytest.mark.integration

EVENTS = 3


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps every request it is sent, decoded."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        requests = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [
            (resource_spans.resource, span)
            for request in self.requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def attributes(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def test_each_event_is_a_trace_under_its_input_linked_to_its_batch(kafka_bootstrap, topics, tmp_path, receiver):
    service = ServiceRunner(
        kafka_bootstrap,
        topics,
        Path("no-model"),
        tmp_path / "service",
        {
            "ENGINE": "echo",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_SERVICE_NAME": "diagram-consumer-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "BATCH_MAX_WAIT_MS": "300",
        },
    ).start()
    try:
        inputs = {}  # trace id -> the input's parent span id
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        for number in range(EVENTS):
            trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            inputs[trace_id] = parent_id
            value = json.dumps({"id": f"traced-{number}", "image": {"base64": png_base64(number)}})
            producer.produce(
                topics.input,
                key=f"key-{number}",
                value=value,
                headers=[("traceparent", f"00-{trace_id}-{parent_id}-01"), ("baggage", "tenant=acme")],
            )
        assert producer.flush(30) == 0
        results = read_records(kafka_bootstrap, topics.output, EVENTS, timeout=60)
        assert len(results) == EVENTS, service.log()
    finally:
        service.stop()  # the SDK exports what is left on shutdown
    assert service.process is not None and service.process.returncode == 0, service.log()

    spans = receiver.spans()
    assert spans, f"nothing exported to {receiver.endpoint}:\n{service.log()}"
    resource = spans[0][0]
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "diagram-consumer-under-test"
    spans = [span for _, span in spans]
    by_id = {span.span_id: span for span in spans}
    events = [span for span in spans if span.name == f"process {topics.input}"]
    batches = {span.span_id: span for span in spans if span.name == "generate batch"}
    assert len(events) == EVENTS and batches

    for event in events:
        trace_id = event.trace_id.hex()
        assert trace_id in inputs, "the event's span is in its input's trace"
        assert event.parent_span_id.hex() == inputs[trace_id], "and a child of the input's span"
        assert event.kind == event.SPAN_KIND_CONSUMER
        attrs = attributes(event)
        assert attrs["messaging.system"] == "kafka"
        assert attrs["messaging.destination.name"] == topics.input
        assert attrs["messaging.consumer.group.name"] == topics.group
        assert attrs["messaging.kafka.message.key"].startswith("key-")
        assert isinstance(attrs["messaging.kafka.offset"], int)
        children = [span for span in spans if span.parent_span_id == event.span_id]
        assert {child.name for child in children} == {"fetch", "decode", "prepare", "generate", f"send {topics.output}"}
        assert all(child.trace_id == event.trace_id for child in children)
        (generate,) = [child for child in children if child.name == "generate"]
        assert [link.span_id for link in generate.links][0] in batches, "generate is linked to its batch's span"
    for batch in batches.values():
        assert not batch.parent_span_id, "a batch's span is a root: its events belong to many traces"
        assert {link.span_id for link in batch.links} <= {event.span_id for event in events}
        assert all(link.span_id in by_id for link in batch.links)

    # Each result's traceparent names its event's span: downstream continues this trace.
    event_of = {(event.trace_id.hex(), event.span_id.hex()) for event in events}
    for message in results:
        headers = dict(message.headers())
        _, trace_id, span_id, flags = headers["traceparent"].decode().split("-")
        assert (trace_id, span_id) in event_of and int(flags, 16) & 1
        assert headers["baggage"] == b"tenant=acme"
