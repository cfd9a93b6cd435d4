"""The whole chain, intake to delivery, as `Pipeline` wires it, on in-memory Kafka clients.

`Pipeline.run()` runs on a thread with the fakes from its factories (ENGINE=echo, the real image resolver
on inline images); each test waits for what a user would see (records in the output topics, committed
offsets) with a deadline. The same behaviour against a real broker, with the service as a subprocess:
tests/integration/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import pytest
from confluent_kafka import KafkaError

from consumer import pipeline as pipeline_module
from consumer.engine.echo import ECHO_DESCRIPTION, EchoEngine
from consumer.errors import ExitCode, FetchError
from consumer.events import DeadLetterHeaders, DiagramResult, Source
from consumer.metrics import Metrics
from consumer.offsets import TopicPartitionKey
from consumer.pipeline import Pipeline
from consumer.settings import Settings
from consumer.stages.delivery import at_least_once
from consumer.state import ServiceState
from tests.fakes import (
    FakeConsumer,
    FakeProducer,
    FakeResolver,
    PipelineThread,
    Settlement,
    event_value,
    loop_back,
    png_base64,
    wait_for,
)

IN, OUT, DLQ = "diagram-events", "diagram-descriptions", "diagram-events-dlq"
GUARANTEES = ["at_least_once", "exactly_once"]
SHUTDOWN_TIMEOUT = 5.0
DEADLINE = 15.0
"""How long a test waits for what it expects to see (it usually takes well under a second)."""


@dataclass
class Run:
    pipeline: Pipeline
    consumer: FakeConsumer
    producer: FakeProducer
    thread: PipelineThread
    partitions: int

    def until(self, condition: Callable[[], object], what: str) -> None:
        wait_for(condition, DEADLINE, what)

    def assigned(self) -> set[TopicPartitionKey]:
        return {(p.topic, p.partition) for p in self.consumer.assignment()}

    def add_events(self, partition: int, count: int) -> None:
        """Valid events e-<partition>-<offset>, keyed k-<partition>-<offset>, each with its own image."""
        for _ in range(count):
            offset = self.consumer.end_offset((IN, partition))
            value = event_value(f"e-{partition}-{offset}", {"base64": png_base64(offset)})
            self.consumer.append(IN, partition, value, key=f"k-{partition}-{offset}")

    def results(self) -> list[DiagramResult]:
        return [DiagramResult.model_validate_json(message.value()) for message in self.producer.records_in(OUT)]

    def dead_letters(self) -> list[DeadLetterHeaders]:
        return [
            DeadLetterHeaders.model_validate({name: value.decode() for name, value in message.headers() or []})
            for message in self.producer.records_in(DLQ)
        ]

    def settled(self) -> dict[TopicPartitionKey, set[int]]:
        """Input offsets with a published result or dead letter, per partition."""
        offsets: dict[TopicPartitionKey, set[int]] = {}
        for result in self.results():
            offsets.setdefault((IN, result.metadata.source.partition), set()).add(result.metadata.source.offset)
        for headers in self.dead_letters():
            offsets.setdefault((IN, int(headers.source_partition)), set()).add(int(headers.source_offset))
        return offsets

    def all_committed(self) -> bool:
        """Every input partition's committed offset is its end (partitions with no record aside)."""
        ends = {(IN, p): self.consumer.end_offset((IN, p)) for p in range(self.partitions)}
        return all(self.consumer.committed_offsets.get(tp) == end for tp, end in ends.items() if end)

    def assert_nothing_committed_unsettled(self) -> None:
        """Every record below a committed offset has gone on (the guarantee a crash or a rebalance must
        keep): an input has its result or dead letter published, or a retry hop (RETRY_DELAYS), and so has
        a retry record, or a hop to a later attempt. No commit was made for a partition this member did
        not own."""
        settlement = Settlement.of(self.producer.records, OUT, DLQ)
        for tp, committed in self.consumer.committed_offsets.items():
            unsettled = [o for o in range(committed) if not settlement.settles(self.consumer, tp, o, IN)]
            assert unsettled == [], f"{tp} committed to {committed} with {unsettled} unsettled"
        assert self.consumer.unowned_commits == []


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    # fit_to_topic_limits asks the brokers for the topics' limits; FakeProducer's topic_limits stand in.
    monkeypatch.setattr(pipeline_module, "fit_to_topic_limits", lambda config, topics, timeout=10.0: config)
    monkeypatch.setattr(pipeline_module, "ensure_retry_topics", lambda settings, config, timeout=10.0: None)
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 0.05)


@pytest.fixture
def start():
    runs: list[Run] = []

    def build(
        guarantee: str = "at_least_once",
        partitions: int = 2,
        events_per_partition: int = 0,
        topic_limits: dict[str, int] | None = None,
        engine_delay_s: float = 0.0,
        **overrides,
    ) -> Run:
        settings = Settings.from_environ(
            {},
            input_topic=IN,
            output_topic=OUT,
            dlq_topic=DLQ,
            kafka_group_id="pipeline-test",
            processing_guarantee=guarantee,
            batch_max_wait_ms=5,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            **overrides,
        )
        topics = {IN: partitions, **{topic: partitions for topic in settings.retry_topics()}}
        consumer = FakeConsumer(partitions=topics)
        producer = FakeProducer(topic_limits=topic_limits, partitions=topics, group_offsets=consumer.committed_offsets)
        loop_back(producer, consumer, settings.retry_topics())
        engine = EchoEngine(delay_s=engine_delay_s)
        pipeline = Pipeline(
            settings,
            engine,
            engine.load(),
            4,
            Metrics(),
            ServiceState(model="echo"),
            consumer_factory=consumer.factory,
            producer_factory=producer.factory,
        )
        run = Run(pipeline, consumer, producer, PipelineThread(pipeline), partitions)
        for partition in range(partitions):
            run.add_events(partition, events_per_partition)
        runs.append(run)
        run.thread.start()
        return run

    yield build
    for run in runs:
        if run.thread.running:
            run.thread.stop(SHUTDOWN_TIMEOUT + 5)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_every_event_gets_its_result_and_every_offset_is_committed(start, guarantee):
    run = start(guarantee, partitions=2, events_per_partition=5)
    run.until(lambda: len(run.results()) == 10 and run.all_committed(), what="ten results, all committed")
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN

    assert run.consumer.committed_offsets == {(IN, 0): 5, (IN, 1): 5}
    results = run.results()
    assert sorted(r.id for r in results) == sorted(f"e-{p}-{o}" for p in (0, 1) for o in range(5))
    for result, message in zip(results, run.producer.records_in(OUT), strict=True):
        source = result.metadata.source
        assert result.id == f"e-{source.partition}-{source.offset}" and source.topic == IN
        assert message.key() == f"k-{source.partition}-{source.offset}".encode()
        assert result.description == ECHO_DESCRIPTION and result.metadata.model == "echo"
    assert run.producer.records_in(DLQ) == []
    if guarantee == "exactly_once":
        assert run.consumer.commits == []  # offsets only inside transactions
        assert all(t.state in ("committed", "aborted") for t in run.producer.transactions)
    else:
        assert run.producer.transactions == []
    run.assert_nothing_committed_unsettled()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_invalid_events_are_dead_lettered_and_the_partition_keeps_moving(start, guarantee):
    run = start(guarantee, partitions=1)
    run.add_events(0, 1)
    run.consumer.append(IN, 0, b"this is not JSON", key="k-0-1")
    run.add_events(0, 1)
    run.consumer.append(IN, 0, event_value("e-0-3", {"base64": "aGVsbG8gd29ybGQ="}), key="k-0-3")  # "hello world"
    run.add_events(0, 1)
    run.until(
        lambda: len(run.results()) == 3 and len(run.dead_letters()) == 2 and run.all_committed(),
        what="three results and two dead letters, all committed",
    )
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN

    assert sorted(r.metadata.source.offset for r in run.results()) == [0, 2, 4]
    not_json, not_an_image = sorted(run.dead_letters(), key=lambda headers: int(headers.source_offset))
    assert (not_json.source_offset, not_json.error_stage, not_json.error_reason) == ("1", "parse", "not_json")
    assert (not_an_image.source_offset, not_an_image.error_stage) == ("3", "decode")
    assert not_an_image.error_reason == "not_an_image" and not_an_image.event_id == "e-0-3"
    first_dead = run.producer.records_in(DLQ)[0]
    assert first_dead.key() in (b"k-0-1", b"k-0-3") and first_dead.value() is not None  # the input, unchanged
    assert run.consumer.committed_offsets == {(IN, 0): 5}
    run.assert_nothing_committed_unsettled()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_result_too_large_for_the_output_topic_is_dead_lettered(start, guarantee):
    run = start(guarantee, partitions=1, events_per_partition=3, topic_limits={OUT: 300})
    run.until(lambda: len(run.dead_letters()) == 3 and run.all_committed(), what="three dead letters, committed")
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN
    assert run.results() == []
    for headers in run.dead_letters():
        assert (headers.error_stage, headers.error_reason) == ("publish", "too_large")
        assert f"what {OUT} accepts (max.message.bytes)" in headers.error_message
    run.assert_nothing_committed_unsettled()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_stop_request_finishes_cleanly_and_leaves_the_group(start, guarantee):
    run = start(guarantee, partitions=2, events_per_partition=3)
    run.until(lambda: run.results(), what="a first result")
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN
    assert run.consumer.closed and run.pipeline.state.stopping
    run.assert_nothing_committed_unsettled()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_partition_revoked_mid_flight_and_granted_again_loses_nothing(start, guarantee):
    # A slow model and a small window: when the partition goes, some of its events are being generated,
    # some wait in the window, and its partitions may be paused.
    run = start(guarantee, partitions=2, events_per_partition=8, engine_delay_s=0.05, max_in_flight=4)
    run.until(lambda: run.results(), what="a first result")
    run.consumer.revoke([(IN, 1)])
    run.until(lambda: (IN, 1) not in run.assigned(), what="the revoke")
    run.consumer.grant([(IN, 1)])
    run.until(run.all_committed, what="every offset committed")
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN

    assert run.settled() == {(IN, 0): set(range(8)), (IN, 1): set(range(8))}
    if guarantee == "exactly_once":
        sources = [(r.metadata.source.partition, r.metadata.source.offset) for r in run.results()]
        assert len(sources) == len(set(sources)) == 16  # a read_committed reader sees each result once
    run.assert_nothing_committed_unsettled()


def test_a_failed_publish_stops_the_service_without_committing_past_it(start):
    run = start("at_least_once", partitions=1)
    run.producer.delivery_error = lambda m: KafkaError(KafkaError._MSG_TIMED_OUT) if m.key() == b"k-0-2" else None
    run.add_events(0, 5)
    assert run.thread.wait(SHUTDOWN_TIMEOUT + 5) == ExitCode.FAILED
    assert run.consumer.committed_offsets.get((IN, 0), 0) <= 2
    assert run.consumer.closed
    run.assert_nothing_committed_unsettled()


def test_a_fenced_transactional_producer_stops_the_service_without_committing(start):
    run = start("exactly_once", partitions=1)
    run.producer.fail_next("commit_transaction", KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    run.add_events(0, 3)
    assert run.thread.wait(SHUTDOWN_TIMEOUT + 5) == ExitCode.FAILED
    assert run.consumer.committed_offsets == {} and run.producer.records_in(OUT) == []
    assert run.consumer.closed


# -- retries (RETRY_DELAYS) --------------------------------------------------------------------------------
FLAKY = "https://images.example.com/flaky.png"
DOWN = "https://images.example.com/down.png"


def http_503() -> FetchError:
    return FetchError("image URL answered HTTP 503", reason="http_503", retryable=True)


@pytest.fixture
def resolver(monkeypatch) -> FakeResolver:
    """The pipeline's image resolver: images by URL, failures scripted per URL."""
    fake = FakeResolver()
    monkeypatch.setattr(pipeline_module, "ImageResolver", lambda settings: fake)
    return fake


def retry_topics_committed(run: Run) -> bool:
    """Every retry-topic partition with records is committed to its end: nothing waits or is in flight."""
    topics = run.pipeline.settings.retry_topics()
    ends = {(t, p): run.consumer.end_offset((t, p)) for t in topics for p in range(run.partitions)}
    return all(run.consumer.committed_offsets.get(tp) == end for tp, end in ends.items() if end)


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_transient_failure_hops_through_the_retry_topics_to_its_result_or_one_dead_letter(start, resolver, guarantee):
    resolver.fail(FLAKY, http_503(), http_503())  # answers on the third attempt
    resolver.fail(DOWN, *[http_503()] * 5)  # never answers
    run = start(guarantee, partitions=2, retry_delays="20ms,40ms")
    run.consumer.append(IN, 0, event_value("flaky", {"url": FLAKY}), key="k-flaky")
    run.consumer.append(IN, 1, event_value("down", {"url": DOWN}), key="k-down")
    run.add_events(0, 2)
    run.until(
        lambda: len(run.results()) == 3 and len(run.dead_letters()) == 1 and run.all_committed()
        and retry_topics_committed(run),
        what="three results and one dead letter, every topic committed",
    )  # fmt: skip
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN

    flaky = next(result for result in run.results() if result.id == "flaky")
    assert flaky.metadata.source == Source(topic=IN, partition=0, offset=0)  # the original input
    (dead,) = run.dead_letters()
    assert (dead.event_id, dead.error_reason, dead.error_attempts) == ("down", "http_503", "3")
    assert (dead.source_topic, dead.source_partition, dead.source_offset) == (IN, "1", "0")
    assert len(json.loads(dead.error_history or "[]")) == 3
    assert resolver.calls.count(FLAKY) == 3 and resolver.calls.count(DOWN) == 3  # one fetch per attempt
    hops = run.producer.records_in(f"{IN}-retry-20ms") + run.producer.records_in(f"{IN}-retry-40ms")
    assert sorted(dict(hop.headers())["retry.attempt"] for hop in hops) == [b"2", b"2", b"3", b"3"]
    registry = run.pipeline.metrics.registry
    assert registry.get_sample_value("diagram_events_total", {"outcome": "retry_scheduled"}) == 4
    assert registry.get_sample_value("diagram_events_total", {"outcome": "dead_lettered"}) == 1
    run.assert_nothing_committed_unsettled()


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_an_event_waiting_for_its_retry_holds_up_nothing_else(start, resolver, guarantee):
    resolver.fail(FLAKY, http_503())
    run = start(guarantee, partitions=2, retry_delays="1h", max_in_flight=2)
    run.consumer.append(IN, 0, event_value("flaky", {"url": FLAKY}), key="k-flaky")
    run.add_events(0, 4)
    run.add_events(1, 4)
    run.until(lambda: len(run.results()) == 8 and run.all_committed(), what="the other events, all committed")
    retry = (f"{IN}-retry-3600s", next(hop.partition() for hop in run.producer.records_in(f"{IN}-retry-3600s")))
    run.until(lambda: run.pipeline.state.waiting == [f"{retry[0]}[{retry[1]}]"], what="the retry waiting")
    assert run.pipeline.state.paused == [] and run.pipeline.tracker.in_flight() == 0  # it holds no slot
    assert run.consumer.committed_offsets.get(retry, 0) == 0  # nor lets its retry topic be committed past it
    assert run.thread.stop(SHUTDOWN_TIMEOUT + 5) == ExitCode.CLEAN
    assert "flaky" not in {result.id for result in run.results()} and run.dead_letters() == []
