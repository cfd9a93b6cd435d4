"""At-least-once delivery: an input offset is committed only once its result or dead letter is acknowledged,
a failed publish stops all commits, and an oversized record is settled by its fallback instead.

Driven with a FakeProducer (librdkafka's own size checks, per-topic limits in the delivery callback) and
a FakeConsumer; records are built by the real Records stage, so their fallbacks are the real ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException

from consumer.engine.echo import EchoEngine
from consumer.events import DeadLetterHeaders
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages.base import FatalLatch
from consumer.stages.delivery import at_least_once
from consumer.stages.delivery.at_least_once import AtLeastOnce
from consumer.stages.records import Records
from consumer.state import ServiceState
from tests.fakes import FakeConsumer, FakeProducer, described

TP = ("events", 0)


@dataclass
class Rig:
    delivery: AtLeastOnce
    records: Records
    producer: FakeProducer
    consumer: FakeConsumer
    tracker: OffsetTracker
    latch: FatalLatch
    state: ServiceState
    metrics: Metrics

    def publish(self, offsets: list[int], text: str = "| 1 | step | role |", **kwargs) -> None:
        """Results for new input records at `offsets`, handed to delivery as one batch."""
        self.records.submit([described(self.tracker, TP, offset, text, **kwargs) for offset in offsets])

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def rig(monkeypatch):
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 0.0)  # every poll commits what is done

    def build(message_max_bytes: int = 1_000_000, topic_limits: dict[str, int] | None = None) -> Rig:
        settings = Settings.from_environ({}, output_topic="results", dlq_topic="dead-letters")
        consumer = FakeConsumer({"group.id": "delivery-test"}, partitions={TP[0]: 1})
        consumer.subscribe([TP[0]])
        consumer.poll(0)  # joins the group: TP is assigned
        producer = FakeProducer({"message.max.bytes": message_max_bytes}, topic_limits=topic_limits)
        tracker, metrics, latch, state = OffsetTracker(), Metrics(), FatalLatch(), ServiceState(model="test")
        delivery = AtLeastOnce(producer, consumer, tracker, metrics, latch, state)
        consumer.on_commit = delivery.on_commit
        records = Records(settings, EchoEngine().load(), metrics, delivery)
        return Rig(delivery, records, producer, consumer, tracker, latch, state, metrics)

    return build


def dead_letter_headers(rig: Rig) -> list[DeadLetterHeaders]:
    return [
        DeadLetterHeaders.model_validate({name: value.decode() for name, value in message.headers() or []})
        for message in rig.producer.records_in("dead-letters")
    ]


def test_offsets_are_committed_only_up_to_the_first_unacknowledged_result(rig):
    r = rig()
    r.producer.hold = lambda message: message.key() == b"k10"
    r.publish([10, 11, 12])
    r.delivery.poll(0)
    assert [m.key() for m in r.producer.records_in("results")] == [b"k11", b"k12"]
    assert r.consumer.committed_offsets == {TP: 10}  # 11 and 12 are done, 10 is not

    r.producer.hold = None
    r.delivery.poll(0)
    assert r.consumer.committed_offsets == {TP: 13}
    r.consumer.poll(0)  # the consumer answers the commit: the gauge shows what the broker acknowledged
    assert r.sample("diagram_committed_offset", topic="events", partition="0") == 13
    assert r.sample("diagram_events_total", outcome="ok") == 3
    assert r.consumer.unowned_commits == []


def test_a_failed_publish_trips_the_latch_and_nothing_more_is_committed(rig):
    r = rig()
    r.producer.delivery_error = lambda m: KafkaError(KafkaError._MSG_TIMED_OUT) if m.key() == b"k11" else None
    r.publish([10, 11, 12])
    r.delivery.poll(0)
    assert r.latch.tripped()
    assert isinstance(r.latch.error, KafkaException) and r.latch.error.args[0].code() == KafkaError._MSG_TIMED_OUT
    r.publish([13])
    r.delivery.poll(0)
    assert r.delivery.join(1) is False
    assert r.consumer.committed_offsets == {}  # 10 and 12 were acknowledged, but after an error nothing goes


def test_a_result_over_the_producers_limit_is_replaced_by_a_dead_letter(rig):
    r = rig(message_max_bytes=1000)
    r.publish([10], text="x" * 2000)
    r.delivery.poll(0)
    assert r.producer.records_in("results") == []
    (headers,) = dead_letter_headers(r)
    assert (headers.error_stage, headers.error_reason, headers.source_offset) == ("publish", "too_large", "10")
    assert "the producer's message.max.bytes" in headers.error_message
    assert r.consumer.committed_offsets == {TP: 11}
    assert r.sample("diagram_events_total", outcome="dead_lettered") == 1


def test_a_result_the_topic_refuses_is_replaced_by_a_dead_letter(rig):
    r = rig(topic_limits={"results": 500})
    r.publish([10], text="x" * 600)
    r.delivery.poll(0)
    assert [message.key() for message, _ in r.producer.failed] == [b"k10"]
    assert r.producer.records_in("results") == []
    (headers,) = dead_letter_headers(r)
    assert (headers.error_stage, headers.error_reason) == ("publish", "too_large")
    assert "what results accepts (max.message.bytes)" in headers.error_message
    assert r.consumer.committed_offsets == {TP: 11}


def test_an_input_too_large_for_the_dead_letter_topic_is_settled_without_its_value(rig):
    r = rig(topic_limits={"results": 300, "dead-letters": 600})
    r.publish([10], text="x" * 400, value=b'{"id": "e-10", "pad": "' + b"y" * 700 + b'"}')
    r.delivery.poll(0)
    (dead,) = r.producer.records_in("dead-letters")
    assert dead.value() is None and dead.key() == b"k10"
    (headers,) = dead_letter_headers(r)
    assert headers.error_value_omitted is not None and int(headers.error_value_omitted) > 700
    assert r.consumer.committed_offsets == {TP: 11}


def test_a_refused_commit_is_made_again(rig):
    r = rig()
    r.consumer.commit_error = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    r.publish([10])
    r.delivery.poll(0)
    r.consumer.poll(0)  # the consumer answers the commit: refused
    r.consumer.commit_error = None
    r.delivery.poll(0)
    assert r.consumer.committed_offsets == {TP: 11}


def test_a_commit_still_unanswered_when_the_partitions_go_is_made_again(rig, monkeypatch):
    # librdkafka queues a commit behind a rebalance's JoinGroup; it is answered, refused for its stale
    # generation, only after the revocation has run: the revocation must not count it as done.
    r = rig()
    r.consumer.commit_error = KafkaError(KafkaError.ILLEGAL_GENERATION)
    r.publish([10])
    r.delivery.poll(0)  # acknowledged, and its offset sent in an asynchronous commit, unanswered
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r.consumer.commit_error = None
    with r.delivery.revoking([TP], broker_ok=True):
        assert r.consumer.committed_offsets == {TP: 11}
        r.tracker.revoke(TP)
    r.consumer.poll(0)  # the old refusal arrives late: nothing to redo, nothing committed twice
    assert r.consumer.commits == [{TP: 11}]


def test_join_asks_again_while_a_rebalance_refuses_its_commit(rig, monkeypatch):
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r = rig()
    r.publish([10, 11])
    r.consumer.commit_error = KafkaError(KafkaError.REBALANCE_IN_PROGRESS)
    rounds = []

    def between() -> None:  # the pipeline serves the group's callbacks here: the rebalance completes
        rounds.append(1)
        r.consumer.poll(0)
        r.consumer.commit_error = None

    assert r.delivery.join(5, between=between) is True
    assert len(rounds) == 2  # refused, then sent again and acknowledged
    assert r.consumer.commits == [{TP: 12}] and r.consumer.committed_offsets == {TP: 12}


def test_join_waits_for_an_unanswered_commit_only_until_its_deadline(rig):
    """A broker that stopped answering: the commit is sent, its answer never comes, and join returns at its
    deadline instead of blocking in a synchronous commit for socket.timeout.ms."""
    r = rig()
    r.publish([10])
    rounds = []
    assert r.delivery.join(0.3, between=lambda: rounds.append(time.sleep(0.01))) is False  # answers never served
    assert len(rounds) >= 1 and r.consumer.commits == [{TP: 11}]  # sent once, not again while unanswered
    with r.delivery.revoking([TP], broker_ok=True):  # leaving the group afterwards: no waited commit either
        r.tracker.revoke(TP)
    assert r.consumer.commits == [{TP: 11}]


def test_join_gives_up_on_a_refused_commit_at_its_deadline(rig):
    r = rig()
    r.publish([10])
    r.consumer.commit_error = KafkaError(KafkaError.ILLEGAL_GENERATION)
    assert r.delivery.join(0.3) is False
    assert r.consumer.committed_offsets == {}


def test_results_of_a_revoked_partition_are_not_published(rig):
    r = rig()
    outcome = described(r.tracker, TP, 10)
    r.tracker.revoke(TP)
    r.records.submit([outcome])
    r.delivery.poll(0)
    assert r.producer.records == [] and len(r.producer) == 0
    assert r.consumer.committed_offsets == {}


def test_revoking_commits_what_was_acknowledged_before_the_partitions_go(rig, monkeypatch):
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r = rig()
    r.publish([10, 11])  # produced, acknowledgements not yet served
    with r.delivery.revoking([TP], broker_ok=True):
        assert r.consumer.committed_offsets == {TP: 12}
        r.tracker.revoke(TP)
    assert r.consumer.unowned_commits == []


def test_lost_partitions_commit_nothing(rig, monkeypatch):
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r = rig()
    r.publish([10])
    with r.delivery.revoking([TP], broker_ok=True, lost=True):
        r.tracker.revoke(TP)
    assert r.consumer.committed_offsets == {}


def test_join_publishes_what_is_queued_and_commits_it(rig, monkeypatch):
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r = rig()
    r.publish([10, 11])
    assert r.delivery.join(1) is True
    assert len(r.producer) == 0 and r.consumer.committed_offsets == {TP: 12}


def eleven_held(rig) -> Rig:
    """Results for offsets 10-12 published; the broker acknowledges 10 and 12, never 11."""
    r = rig()
    r.producer.hold = lambda message: message.key() == b"k11"
    r.publish([10, 11, 12])
    return r


def test_join_reports_unacknowledged_work_and_commits_only_below_it(rig, monkeypatch):
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r = eleven_held(rig)
    assert r.delivery.join(1) is False
    assert r.consumer.committed_offsets == {TP: 11}


def test_join_out_of_time_still_sends_the_commit_of_what_was_acknowledged(rig, monkeypatch):
    """A flush that took the whole deadline (here: none was left) leaves the acknowledged part to commit."""
    monkeypatch.setattr(at_least_once, "COMMIT_INTERVAL_S", 3600.0)
    r = eleven_held(rig)
    assert r.delivery.join(0) is False
    assert r.consumer.commits == [{TP: 11}]


def test_join_commits_nothing_while_the_broker_is_unreachable(rig):
    r = rig()
    r.state.broker_ok = False
    r.publish([10])
    assert r.delivery.join(1) is False
    assert r.consumer.committed_offsets == {}


def test_a_record_the_broker_refuses_for_good_is_settled_by_its_fallback(rig):
    """INVALID_RECORD (say, no key on a compacted topic) is about the record, not the broker: its dead
    letter settles the input, and the replica goes on."""
    r = rig()
    r.producer.delivery_error = lambda message: (
        KafkaError(KafkaError.INVALID_RECORD) if message.topic() == "results" else None
    )
    r.publish([0])
    r.producer.flush(1)
    r.delivery.poll()
    assert not r.latch.tripped()
    [dead] = dead_letter_headers(r)
    assert (dead.error_stage, dead.error_reason) == (
        "publish",
        "refused",
    ) and "results refused it" in dead.error_message
    assert r.consumer.committed_offsets == {TP: 1}


def test_a_full_local_queue_is_waited_out_for_a_bounded_time(rig, monkeypatch):
    from consumer.stages.delivery import base

    monkeypatch.setattr(base, "QUEUE_FULL_WAIT_S", 0.05)
    r = rig()
    for _ in range(100):
        r.producer.fail_next("produce", BufferError("Local: Queue full"))
    with pytest.raises(RuntimeError, match="stayed full"):
        r.publish([0])
