"""Records: what a result and a dead letter look like to whoever reads the output topics, and what
settles an input when its record is too large to publish.

The values and headers are read back through the contracts in consumer/events.py, as a downstream
consumer would read them.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future
from dataclasses import replace

import pytest

from consumer.engine.adapters import AdapterVersion
from consumer.engine.base import Generation
from consumer.engine.echo import EchoEngine
from consumer.errors import FetchError, ParseError
from consumer.events import MAX_MESSAGE_CHARS as MAX_ERROR_MESSAGE_CHARS
from consumer.events import DeadLetterHeaders, DiagramEvent, DiagramResult, ImageRef, Source
from consumer.images import LoadedImage
from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.stages.base import PRODUCER_LIMIT, Described, Failed, InputRecord, OutgoingRecord, WorkItem, topic_limit
from consumer.stages.records import Records
from tests.fakes import Collector, image_of

SOURCE = InputRecord("events", 2, 41, b"order-41", b'{"id": "e-41", "image": {"url": "https://x/41.png"}}')
INFO = EchoEngine().load()


@pytest.fixture
def stage():
    settings = Settings.from_environ({}, output_topic="results", dlq_topic="dead-letters", max_event_bytes=100)
    collector = Collector[list[OutgoingRecord]]()
    return Records(settings, INFO, Metrics(), collector), collector


def described(batch_size: int = 2) -> Described:
    return described_for(SOURCE, batch_size)


def described_for(source: InputRecord, batch_size: int = 2) -> Described:
    event = DiagramEvent(id="e-41", image=ImageRef(url="https://x/41.png"), metadata={"tenant": "acme"})
    image: Future[LoadedImage] = Future()
    loaded = LoadedImage(image=image_of(41, size=(64, 48)), source_bytes=1234)
    image.set_result(loaded)
    item = WorkItem(source, epoch=3, event=event, image=image, event_id=event.id)
    return Described(item, loaded, Generation(text="| 1 | Receive order | Sales |", output_tokens=9), 0.25, batch_size)


def failed(error, source: InputRecord = SOURCE, event_id: str | None = "e-41") -> Failed:
    return Failed(WorkItem(source, epoch=3, failure=error, event_id=event_id), error)


def headers_of(record: OutgoingRecord) -> DeadLetterHeaders:
    assert record.headers is not None
    return DeadLetterHeaders.model_validate(dict(record.headers))


def test_a_result_carries_the_description_and_its_metadata(stage):
    records, collector = stage
    records.submit([described()])
    ((result,),) = collector.taken
    assert (result.topic, result.key, result.headers, result.outcome) == ("results", b"order-41", None, "ok")
    assert (result.source, result.epoch) == (SOURCE, 3)
    parsed = DiagramResult.model_validate_json(result.value)
    assert parsed.id == "e-41" and parsed.description == "| 1 | Receive order | Sales |"
    assert parsed.input_metadata == {"tenant": "acme"}
    metadata = parsed.metadata
    assert metadata.source == Source(topic="events", partition=2, offset=41)
    assert (metadata.model, metadata.adapter, metadata.device) == (INFO.model, INFO.adapter, INFO.device)
    assert (metadata.image_size, metadata.output_tokens, metadata.batch_size) == ((64, 48), 9, 2)
    assert metadata.generation_time == 0.25 and metadata.inference_time >= 0


def test_a_result_names_the_adapter_it_ran_with(stage):
    records, collector = stage
    version = AdapterVersion("bpmn", "/models/bpmn", "9f" * 32)
    generated = described()
    records.submit([replace(generated, generation=replace(generated.generation, adapter=version))])
    ((result,),) = collector.taken
    metadata = DiagramResult.model_validate_json(result.value).metadata
    assert (metadata.adapter, metadata.adapter_name, metadata.adapter_hash) == ("/models/bpmn", "bpmn", "9f" * 32)


def test_a_dead_letter_keeps_the_input_and_says_what_failed_in_its_headers(stage):
    records, collector = stage
    error = FetchError("HTTP 404 from images.example.com", reason="http_404")
    error.attempts = 3
    records.submit([failed(error)])
    ((dead,),) = collector.taken
    assert (dead.topic, dead.outcome) == ("dead-letters", "dead_lettered")
    assert (dead.key, dead.value) == (SOURCE.key, SOURCE.value)
    headers = headers_of(dead)
    assert (headers.error_stage, headers.error_class, headers.error_reason) == ("fetch", "FetchError", "http_404")
    assert headers.error_message == "HTTP 404 from images.example.com" and headers.error_attempts == "3"
    assert (headers.source_topic, headers.source_partition, headers.source_offset) == ("events", "2", "41")
    assert headers.event_id == "e-41" and headers.error_value_omitted is None
    failures = records.metrics.registry.get_sample_value(
        "diagram_event_failures_total", {"stage": "fetch", "reason": "http_404"}
    )
    assert failures == 1


def test_outcomes_keep_their_order_and_an_unknown_id_is_left_out(stage):
    records, collector = stage
    records.submit([failed(ParseError("value is not JSON", reason="not_json"), event_id=None), described()])
    dead, result = collector.taken[0]
    assert dead.topic == "dead-letters" and result.topic == "results"
    assert "event.id" not in dict(dead.headers or [])


def test_a_long_error_message_is_cut(stage):
    records, collector = stage
    records.submit([failed(ParseError("x" * 10_000, reason="invalid_field"))])
    assert len(headers_of(collector.taken[0][0]).error_message) == MAX_ERROR_MESSAGE_CHARS


def test_an_input_over_max_event_bytes_is_dead_lettered_without_its_value(stage):
    records, collector = stage
    oversized = InputRecord("events", 0, 9, b"k", b"{" + b" " * 148 + b"}")
    records.submit([failed(ParseError("event is 150 bytes", reason="too_large"), source=oversized)])
    ((dead,),) = collector.taken
    assert dead.value is None and dead.key == b"k"
    assert headers_of(dead).error_value_omitted == "150"
    assert dead.fallback is not None  # smaller still: the key hashed
    hashed = dead.fallback(PRODUCER_LIMIT)
    assert hashed.key == hashlib.sha256(b"k").hexdigest().encode() and hashed.fallback is not None
    assert hashed.fallback(PRODUCER_LIMIT).fallback is None  # last: the input's travelling headers left out
    assert headers_of(hashed).error_key_hashed == "1" and headers_of(hashed).error_value_omitted == "150"


def test_a_result_too_large_to_publish_falls_back_to_a_publish_dead_letter(stage):
    records, collector = stage
    records.submit([described()])
    result = collector.taken[0][0]
    assert result.fallback is not None
    dead = result.fallback(topic_limit("results"))
    assert (dead.topic, dead.outcome) == ("dead-letters", "dead_lettered")
    assert (dead.key, dead.value) == (SOURCE.key, SOURCE.value)
    assert (dead.source, dead.epoch, dead.event_id) == (SOURCE, 3, "e-41")
    headers = headers_of(dead)
    assert (headers.error_stage, headers.error_class, headers.error_reason) == ("publish", "PublishError", "too_large")
    assert f"the result ({len(result.value)} bytes) was refused" in headers.error_message
    assert "what results accepts (max.message.bytes)" in headers.error_message
    refused = result.fallback("the producer refused it: TypeError: bad header")
    assert headers_of(refused).error_reason == "refused" and "bad header" in headers_of(refused).error_message


def test_a_dead_letter_too_large_to_publish_falls_back_to_one_without_its_value(stage):
    records, collector = stage
    records.submit([failed(FetchError("HTTP 404", reason="http_404"))])
    dead = collector.taken[0][0]
    assert dead.fallback is not None
    smaller = dead.fallback(PRODUCER_LIMIT)
    assert smaller.value is None and smaller.key == SOURCE.key and smaller.topic == "dead-letters"
    headers = headers_of(smaller)
    assert headers.error_value_omitted == str(len(SOURCE.value))
    assert headers.error_reason == "http_404"  # still the original failure
    assert smaller.fallback is not None
    smallest = smaller.fallback(PRODUCER_LIMIT)  # a key too large to send again: its SHA-256 instead
    assert smallest.key == hashlib.sha256(SOURCE.key).hexdigest().encode()
    assert headers_of(smallest).error_key_hashed == str(len(SOURCE.key)) and smallest.fallback is not None


def test_trace_context_and_chosen_headers_travel_onto_results_and_dead_letters():
    settings = Settings.from_environ(
        {}, output_topic="results", dlq_topic="dead-letters", propagate_headers="x-tenant*"
    )
    collector = Collector[list[OutgoingRecord]]()
    records = Records(settings, EchoEngine().load(), Metrics(), collector)
    traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    incoming = (
        ("traceparent", traceparent), ("tracestate", b"vendor=1"), ("x-tenant-id", b"acme"), ("x-other", b"no"),
        ("error.stage", b"forged"), ("baggage", b"k=" + b"v" * 9000),
    )  # fmt: skip
    source = InputRecord("events", 2, 41, b"k", b'{"id": "e-41"}', headers=incoming)
    records.submit([described_for(source), failed(FetchError("HTTP 404", reason="http_404"), source=source)])
    result, dead = collector.taken[0]
    assert result.headers == [
        ("traceparent", traceparent), ("tracestate", b"vendor=1"), ("x-tenant-id", b"acme"),
        ("propagation.dropped", b"baggage"),  # over MAX_PROPAGATED_HEADER_BYTES
    ]  # fmt: skip
    names = [name for name, _ in dead.headers]
    assert names.count("error.stage") == 1 and "x-other" not in names and "traceparent" in names
    assert dict(dead.headers)["error.stage"] == "fetch"  # the input's forged header never travels


def test_a_cloud_event_in_gives_a_cloud_event_out_and_its_dead_letter_keeps_the_input_attributes():
    settings = Settings.from_environ({}, output_topic="results", dlq_topic="dead-letters")
    collector = Collector[list[OutgoingRecord]]()
    records = Records(settings, EchoEngine().load(), Metrics(), collector)
    incoming = (
        ("ce_specversion", b"1.0"), ("ce_id", b"evt-7"), ("ce_type", b"com.example.diagram.uploaded"),
        ("ce_source", b"/uploader"), ("ce_subject", b"order-flow-17"), ("ce_tenant", b"acme"),
        ("content-type", b"application/json"),
    )  # fmt: skip
    source = InputRecord("events", 2, 41, b"k", b'{"id": "e-41"}', headers=incoming)
    records.submit([described_for(source), failed(FetchError("HTTP 404", reason="http_404"), source=source)])
    result, dead = collector.taken[0]
    out = dict(result.headers)
    assert out["ce_specversion"] == b"1.0" and out["ce_type"] == b"diagram.description"
    assert out["ce_source"] == b"/diagram-consumer" and out["ce_id"] != b"evt-7" and out["ce_time"].endswith(b"Z")
    assert (out["ce_subject"], out["ce_correlationid"], out["ce_tenant"]) == (b"order-flow-17", b"evt-7", b"acme")
    assert out["content-type"] == b"application/json"
    kept = [(name, value) for name, value in dead.headers if name.startswith("ce_")]
    assert kept == [(name, value) for name, value in incoming if name.startswith("ce_")]


# -- retries (RETRY_DELAYS) ------------------------------------------------------------------------------
def retrying(delays: str = "1m,10m") -> tuple[Records, Collector[list[OutgoingRecord]], Metrics]:
    settings = Settings.from_environ(
        {}, input_topic="events", output_topic="results", dlq_topic="dead-letters", retry_delays=delays
    )
    collector, metrics = Collector[list[OutgoingRecord]](), Metrics()
    return Records(settings, INFO, metrics, collector), collector, metrics


def consumed(hop: OutgoingRecord, offset: int = 5) -> InputRecord:
    """The hop as the service reads it back from its retry topic."""
    headers = tuple((name, value.encode() if isinstance(value, str) else value) for name, value in hop.headers or [])
    return InputRecord(hop.topic, 0, offset, hop.key, hop.value, headers=headers)


def http_503() -> FetchError:
    return FetchError("image URL https://x/41.png answered HTTP 503", reason="http_503", retryable=True)


def test_a_transient_failure_hops_to_the_first_retry_topic_with_the_input_and_its_headers():
    records, collector, metrics = retrying()
    source = InputRecord("events", 2, 41, b"order-41", b'{"id": "e-41"}', headers=(("traceparent", b"00-ab-cd-01"),))
    records.submit([failed(http_503(), source=source)])
    ((hop,),) = collector.taken
    assert (hop.topic, hop.key, hop.value, hop.outcome) == (
        "events-retry-60s",
        b"order-41",
        b'{"id": "e-41"}',
        "retry_scheduled",
    )
    assert (hop.source, hop.epoch, hop.event_id) == (source, 3, "e-41")
    headers = dict(hop.headers)
    assert headers["traceparent"] == b"00-ab-cd-01"
    assert (headers["retry.attempt"], headers["retry.origin"]) == ("2", "events/2/41")
    assert headers["retry.first_error"] == "fetch/http_503: image URL https://x/41.png answered HTTP 503"
    assert (
        metrics.registry.get_sample_value("diagram_event_failures_total", {"stage": "fetch", "reason": "http_503"})
        is None
    )
    # Too large for the retry topic (or refused): the event is dead-lettered instead, never lost.
    assert hop.fallback is not None
    instead = hop.fallback(topic_limit("events-retry-60s"))
    assert instead.topic == "dead-letters" and headers_of(instead).error_reason == "http_503"


def test_after_the_last_delay_the_dead_letter_lists_every_attempt_and_names_the_original_input():
    records, collector, _ = retrying()
    source = InputRecord("events", 2, 41, b"order-41", b'{"id": "e-41"}', headers=(("replay.count", b"1"),))
    records.submit([failed(http_503(), source=source)])
    first_hop = collector.taken[-1][0]
    timeout = FetchError("took over IMAGE_FETCH_TIMEOUT=10 s", reason="timeout", retryable=True)
    records.submit([failed(timeout, source=consumed(first_hop))])
    second_hop = collector.taken[-1][0]
    assert second_hop.topic == "events-retry-600s" and dict(second_hop.headers)["retry.attempt"] == "3"
    records.submit([failed(http_503(), source=consumed(second_hop, offset=9))])
    dead = collector.taken[-1][0]
    assert (dead.topic, dead.key, dead.value, dead.outcome) == (
        "dead-letters",
        b"order-41",
        b'{"id": "e-41"}',
        "dead_lettered",
    )
    headers = headers_of(dead)
    assert (headers.error_stage, headers.error_reason, headers.error_attempts) == ("fetch", "http_503", "3")
    assert json.loads(headers.error_history) == [
        "fetch/http_503: image URL https://x/41.png answered HTTP 503",
        "fetch/timeout: took over IMAGE_FETCH_TIMEOUT=10 s",
        "fetch/http_503: image URL https://x/41.png answered HTTP 503",
    ]
    # replay sends it back to the input topic, and counts it as the input was counted
    assert (headers.source_topic, headers.source_partition, headers.source_offset) == ("events", "2", "41")
    assert headers.replay_count == "1"
    assert not any(name.startswith("retry.") for name, _ in dead.headers)


def test_a_permanent_failure_is_dead_lettered_at_once_with_the_attempts_before_it():
    records, collector, _ = retrying()
    records.submit([failed(http_503())])
    records.submit([failed(FetchError("HTTP 404", reason="http_404"), source=consumed(collector.taken[-1][0]))])
    headers = headers_of(collector.taken[-1][0])
    assert (headers.error_reason, headers.error_attempts, headers.source_offset) == ("http_404", "2", "41")
    assert [entry.split(":")[0] for entry in json.loads(headers.error_history)] == ["fetch/http_503", "fetch/http_404"]
    records.submit([failed(FetchError("HTTP 404", reason="http_404"))])
    first_time = headers_of(collector.taken[-1][0])
    assert first_time.error_history is None and first_time.error_attempts == "1"  # no hop: as without retries


def test_without_retry_delays_a_transient_failure_is_dead_lettered_as_before(stage):
    records, collector = stage
    records.submit([failed(http_503())])
    ((dead,),) = collector.taken
    assert dead.topic == "dead-letters" and headers_of(dead).error_history is None


def test_a_result_after_retries_names_the_original_input_and_carries_no_retry_header():
    records, collector, _ = retrying()
    source = InputRecord("events", 2, 41, b"order-41", b'{"id": "e-41"}', headers=(("traceparent", b"00-ab-cd-01"),))
    records.submit([failed(http_503(), source=source)])
    records.submit([described_for(consumed(collector.taken[-1][0]))])
    result = collector.taken[-1][0]
    assert DiagramResult.model_validate_json(result.value).metadata.source == Source(
        topic="events", partition=2, offset=41
    )
    assert result.headers == [("traceparent", b"00-ab-cd-01")]
