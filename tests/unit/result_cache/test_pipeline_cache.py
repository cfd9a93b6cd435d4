"""The result cache through the whole pipeline, on in-memory clients: a repeated image is answered
without the model, its entry is published beside its result (in the same transaction under
exactly-once), and a cache entry settles nothing. Against a real broker, with replicas and restarts:
tests/integration/test_result_cache.py."""

from __future__ import annotations

import base64

import pytest
from confluent_kafka import KafkaError
from prometheus_client import generate_latest

from consumer import pipeline as pipeline_module
from consumer.engine.echo import EchoEngine
from consumer.events import DiagramResult
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.result_cache.key import ResultKeyer, content_hash
from consumer.result_cache.step import ResultStep
from consumer.result_cache.store import CacheEntry, ResultCache
from consumer.settings import Settings
from consumer.stages.delivery import at_least_once
from consumer.state import ServiceState
from tests.fakes import FakeConsumer, FakeProducer, PipelineThread, event_value, png_base64, wait_for

IN, OUT, DLQ, CACHE = "diagram-events", "diagram-descriptions", "diagram-events-dlq", "diagram-results-cache"


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr(pipeline_module, "fit_to_topic_limits", lambda config, topics, timeout=10.0: config)
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 0.05)


def run(guarantee: str, values: list[bytes], cache_topic: str | None = CACHE, cache: ResultCache | None = None):
    settings = Settings.from_environ(
        {},
        input_topic=IN,
        output_topic=OUT,
        dlq_topic=DLQ,
        kafka_group_id="cache-test",
        processing_guarantee=guarantee,
        batch_max_wait_ms=5,
        shutdown_timeout=5,
        result_cache_topic=cache_topic,
    )
    consumer = FakeConsumer(partitions={IN: 1})
    producer = FakeProducer(group_offsets=consumer.committed_offsets)
    engine, metrics = EchoEngine(), Metrics()
    info = engine.load()
    if cache is None and cache_topic is not None:
        cache = ResultCache(1_000_000, metrics)
    pipeline = Pipeline(
        settings,
        engine,
        info,
        8,
        metrics,
        ServiceState(model="echo"),
        consumer_factory=consumer.factory,
        producer_factory=producer.factory,
        results=ResultStep(settings, ResultKeyer.for_engine(settings, info), info, cache),
    )
    thread = PipelineThread(pipeline).start()
    try:
        for value in values:
            consumer.append(IN, 0, value, key=b"k")
            offset = consumer.end_offset((IN, 0))
            wait_for(lambda offset=offset: consumer.committed_offsets.get((IN, 0)) == offset, 10, "settled")
    finally:
        thread.stop(10)
    results = [DiagramResult.model_validate_json(m.value()) for m in producer.records_in(OUT)]
    return results, producer, engine, metrics


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_repeated_image_is_answered_from_the_cache(guarantee):
    image = {"base64": png_base64(7)}
    other = {"base64": png_base64(8)}
    values = [event_value("first", image), event_value("second", image), event_value("other", other)]
    results, producer, engine, metrics = run(guarantee, values)
    assert engine.answered == 2, "the repeated image must not be generated again"
    first, second, other = results
    assert [r.metadata.cache for r in results] == ["miss", "hit", "miss"]
    assert second.description == first.description and second.id == "second"
    assert second.metadata.result_key == first.metadata.result_key != other.metadata.result_key
    assert second.metadata.content_hash == first.metadata.content_hash != other.metadata.content_hash
    assert second.metadata.batch_size == 0 and second.metadata.generation_time == 0.0
    entries = producer.records_in(CACHE)
    assert [m.key().decode() for m in entries] == [first.metadata.result_key, other.metadata.result_key]
    entry = CacheEntry.model_validate_json(entries[0].value())
    assert entry.description == first.description and entry.content_hash == first.metadata.content_hash
    text = generate_latest(metrics.registry).decode()
    assert 'diagram_events_total{outcome="ok"} 3.0' in text and 'outcome="cache"' not in text
    assert "diagram_result_cache_hits_total 1.0" in text and "diagram_result_cache_misses_total 2.0" in text
    if guarantee == "exactly_once":
        # Each entry was committed in the transaction of its result; the hit's transaction holds no entry.
        committed = [sorted(m.topic() for m in t.records) for t in producer.transactions if t.state == "committed"]
        assert committed == [[OUT, CACHE], [OUT], [OUT, CACHE]]


def test_the_content_hash_is_of_the_image_bytes():
    results, *_ = run("at_least_once", [event_value("e", {"base64": png_base64(3)})], cache_topic=None)
    assert results[0].metadata.content_hash == content_hash(base64.b64decode(png_base64(3)))
    assert results[0].metadata.cache == "off" and results[0].metadata.result_key is not None


def test_without_a_cache_topic_nothing_is_cached_or_published():
    image = {"base64": png_base64(7)}
    results, producer, engine, _ = run("at_least_once", [event_value("a", image), event_value("b", image)], None)
    assert engine.answered == 2 and [r.metadata.cache for r in results] == ["off", "off"]
    assert {m.topic() for m in producer.records} == {OUT}


def test_a_cache_entry_that_fails_to_publish_fails_no_event():
    """At-least-once: a lost entry costs a generation later, never the event nor the replica."""
    image = {"base64": png_base64(7)}
    consumer = FakeConsumer(partitions={IN: 1})
    producer = FakeProducer(group_offsets=consumer.committed_offsets)
    producer.delivery_error = lambda m: KafkaError(KafkaError._MSG_TIMED_OUT) if m.topic() == CACHE else None
    settings = Settings.from_environ(
        {}, input_topic=IN, output_topic=OUT, dlq_topic=DLQ, batch_max_wait_ms=5, result_cache_topic=CACHE
    )
    engine = EchoEngine()
    info = engine.load()
    pipeline = Pipeline(
        settings,
        engine,
        info,
        8,
        Metrics(),
        ServiceState(model="echo"),
        consumer_factory=consumer.factory,
        producer_factory=producer.factory,
        results=ResultStep(settings, ResultKeyer.for_engine(settings, info), info, ResultCache(1_000_000)),
    )
    consumer.append(IN, 0, event_value("a", image))
    thread = PipelineThread(pipeline).start()
    wait_for(lambda: consumer.committed_offsets.get((IN, 0)) == 1, 10, "the event settled")
    assert not pipeline.latch.tripped()
    assert thread.stop(10) == 0
    assert len(producer.records_in(OUT)) == 1 and producer.records_in(CACHE) == []
