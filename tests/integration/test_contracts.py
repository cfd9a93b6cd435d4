"""Contracts that travel (issue 16): trace context, chosen headers and CloudEvents attributes go on from
an input record to its result and its dead letter, through `python -m consumer run` on the real broker
(ENGINE=echo: what is tested is the records around the model)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from devtools.samples import png_bytes, sample_diagram
from tests.support import ServiceRunner, committed_equals_end, read_to_end

pytestmark = pytest.mark.integration

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def produce_with_headers(bootstrap: str, topic: str, records: list[tuple[str, bytes, list]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers, partition=0)
    assert producer.flush(30) == 0


def test_trace_context_custom_headers_and_cloud_events_travel(kafka_bootstrap, topics, tmp_path):
    image = base64.b64encode(png_bytes(sample_diagram(0, (320, 240)))).decode()
    common = [
        ("traceparent", TRACEPARENT), ("tracestate", b"vendor=1"), ("x-tenant-id", b"acme"), ("x-secret", b"no"),
        ("ce_specversion", b"1.0"), ("ce_id", b"upload-17"), ("ce_type", b"com.example.diagram.uploaded"),
        ("ce_source", b"/uploader"), ("ce_subject", b"order-flow-17"), ("ce_tenant", b"acme"),
    ]  # fmt: skip
    produce_with_headers(
        kafka_bootstrap,
        topics.input,
        [
            ("good", json.dumps({"id": "good", "image": {"base64": image}}).encode(), common),
            ("bad", b"not json", common),
        ],
    )
    runner = ServiceRunner(
        kafka_bootstrap, topics, Path("no-model"), tmp_path / "s",
        {"ENGINE": "echo", "PROPAGATE_HEADERS": "x-tenant-*", "CLOUDEVENTS_SOURCE": "/diagram-consumer/test"},
    ).start()  # fmt: skip
    try:
        settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input, timeout=60)
        assert settled, runner.log()
        [result] = read_to_end(kafka_bootstrap, topics.output)
        [dead] = read_to_end(kafka_bootstrap, topics.dlq)
    finally:
        runner.stop()

    out = dict(result.headers())
    assert (out["traceparent"], out["tracestate"], out["x-tenant-id"]) == (TRACEPARENT, b"vendor=1", b"acme")
    assert "x-secret" not in out
    # A CloudEvent in gives a CloudEvent out, correlated with the input.
    assert out["ce_specversion"] == b"1.0" and out["ce_type"] == b"diagram.description"
    assert out["ce_source"] == b"/diagram-consumer/test" and out["ce_id"] not in (b"upload-17", b"")
    assert (out["ce_correlationid"], out["ce_subject"], out["ce_tenant"]) == (b"upload-17", b"order-flow-17", b"acme")
    assert out["content-type"] == b"application/json" and json.loads(result.value())["id"] == "good"

    kept = dict(dead.headers())
    assert kept["traceparent"] == TRACEPARENT and kept["x-tenant-id"] == b"acme" and "x-secret" not in kept
    assert [(n, v) for n, v in dead.headers() if n.startswith("ce_")] == [(n, v) for n, v in common if n[:3] == "ce_"]
    assert kept["error.stage"] == b"parse"
