"""Exactly-once delivery: each batch is one transaction holding its records and the input offsets they
complete; an aborted transaction rewinds its partitions to be processed again, and nothing of a revoked
partition, or sent with a fenced member's metadata, is ever committed.

Driven with a transactional FakeProducer whose committed offsets land in the FakeConsumer's group
offsets, as a broker keeps both; records are built by the real Records stage.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer.engine.echo import EchoEngine
from consumer.events import DeadLetterHeaders
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.settings import Settings
from consumer.stages.base import FatalLatch
from consumer.stages.delivery.exactly_once import ExactlyOnce, names_a_member
from consumer.stages.records import Records
from consumer.state import ServiceState
from tests.fakes import FakeConsumer, FakeProducer, described, wait_for

TOPIC = "events"
P0, P1 = (TOPIC, 0), (TOPIC, 1)


@dataclass
class Rig:
    delivery: ExactlyOnce
    records: Records
    producer: FakeProducer
    consumer: FakeConsumer
    tracker: OffsetTracker

    def publish(self, tp: TopicPartitionKey, offsets: list[int], text: str = "| 1 | step | role |") -> None:
        """Results for new input records of `tp` at `offsets`, handed to delivery as one batch."""
        self.records.submit([described(self.tracker, tp, offset, text) for offset in offsets])

    def position(self, tp: TopicPartitionKey) -> int:
        return self.consumer.position([TopicPartition(*tp)])[0].offset


@pytest.fixture
def rig():
    def build(topic_limits: dict[str, int] | None = None) -> Rig:
        settings = Settings.from_environ({}, output_topic="results", dlq_topic="dead-letters")
        consumer = FakeConsumer({"group.id": "eos-test"}, partitions={TOPIC: 2})
        for partition in (0, 1):
            for offset in range(20):
                consumer.append(TOPIC, partition, f"event {offset}")
        consumer.subscribe([TOPIC])
        consumer.poll(0)  # joins the group: both partitions assigned, a member id and generation
        producer = FakeProducer(
            {"transactional.id": "eos-test-1"}, topic_limits=topic_limits, group_offsets=consumer.committed_offsets
        )
        tracker = OffsetTracker()
        delivery = ExactlyOnce(producer, consumer, tracker, Metrics(), FatalLatch(), ServiceState(model="test"))
        delivery.start(threading.Event())
        delivery.rebalanced()
        records = Records(settings, EchoEngine().load(), Metrics(), delivery)
        return Rig(delivery, records, producer, consumer, tracker)

    return build


def test_offsets_are_never_sent_with_the_metadata_of_a_fenced_member():
    from consumer.stages.delivery.exactly_once import names_a_member

    member = b"CGMDv2:" + (3).to_bytes(4, sys.byteorder, signed=True) + b"group\x00rdkafka-1234\x00\x01"
    fenced = b"CGMDv2:" + (-1).to_bytes(4, sys.byteorder, signed=True) + b"group\x00\x00\x01"
    assert names_a_member(member)
    assert not names_a_member(fenced)  # the broker would take its offsets without any check


def test_each_batch_is_one_transaction_with_its_records_and_offsets(rig):
    r = rig()
    r.publish(P0, [10, 11])
    r.publish(P0, [12])
    first, second = r.producer.transactions
    assert first.state == second.state == "committed"
    assert [m.key() for m in first.records] == [b"k10", b"k11"] and first.offsets == {P0: 12}
    assert [m.key() for m in second.records] == [b"k12"] and second.offsets == {P0: 13}
    assert first.group_metadata == r.consumer.consumer_group_metadata() and names_a_member(first.group_metadata)
    assert r.consumer.committed_offsets == {P0: 13}
    assert r.consumer.commits == []  # offsets go only through transactions


def test_a_retriable_commit_error_is_retried(rig):
    r = rig()
    r.producer.fail_next("commit_transaction", KafkaError(KafkaError._TIMED_OUT, "coordinator slow", retriable=True))
    r.publish(P0, [10])
    (transaction,) = r.producer.transactions
    assert transaction.state == "committed" and r.consumer.committed_offsets == {P0: 11}


def test_an_abortable_commit_error_aborts_and_rewinds_to_the_committed_offset(rig):
    r = rig()
    r.publish(P0, [10])
    old_epoch = r.tracker.epoch_of(P0)
    r.producer.fail_next(
        "commit_transaction", KafkaError(KafkaError.TRANSACTION_ABORTABLE, "abort it", txn_requires_abort=True)
    )
    r.publish(P0, [11, 12])
    assert r.producer.transactions[-1].state == "aborted"
    assert [m.key() for m in r.producer.aborted] == [b"k11", b"k12"]
    assert [m.key() for m in r.producer.records_in("results")] == [b"k10"]
    assert r.consumer.committed_offsets == {P0: 11}
    assert r.tracker.add(P0, 13) is None  # held: records fetched past the aborted ones are refused

    r.delivery.poll(0)
    assert r.position(P0) == 11  # read again from the committed offset
    assert r.tracker.epoch_of(P0) != old_epoch and r.tracker.add(P0, 11) is not None
    assert r.position(P1) == 0  # untouched


def test_a_partition_with_nothing_committed_rewinds_to_where_its_consuming_started(rig):
    r = rig()
    r.producer.fail_next(
        "send_offsets_to_transaction",
        KafkaError(KafkaError.ILLEGAL_GENERATION, "the group moved on", txn_requires_abort=True),
    )
    r.publish(P1, [4, 5])
    assert r.producer.transactions[-1].state == "aborted" and r.consumer.committed_offsets == {}
    r.delivery.poll(0)
    assert r.position(P1) == 4


def test_a_result_the_topic_refuses_is_dead_lettered_when_the_batch_is_redone(rig):
    r = rig(topic_limits={"results": 300})
    r.publish(P0, [10], text="x" * 400)
    assert r.producer.transactions[-1].state == "aborted"
    r.delivery.poll(0)  # rewinds: the event is processed again
    r.publish(P0, [10], text="x" * 400)
    assert r.producer.transactions[-1].state == "committed"
    assert r.producer.records_in("results") == []
    (dead,) = r.producer.records_in("dead-letters")
    headers = DeadLetterHeaders.model_validate({name: value.decode() for name, value in dead.headers()})
    assert (headers.error_stage, headers.error_reason) == ("publish", "too_large")
    assert "what results accepts (max.message.bytes)" in headers.error_message
    assert r.consumer.committed_offsets == {P0: 11}


def test_records_of_a_revoked_partition_are_never_sent(rig):
    r = rig()
    stale = described(r.tracker, P0, 10)
    r.tracker.revoke(P0)
    r.records.submit([stale, described(r.tracker, P1, 3)])
    (transaction,) = r.producer.transactions
    assert [(m.key(), m.topic()) for m in transaction.records] == [(b"k3", "results")]
    assert transaction.offsets == {P1: 4} and r.consumer.committed_offsets == {P1: 4}


def test_a_batch_left_with_nothing_to_send_commits_nothing(rig):
    r = rig()
    stale = described(r.tracker, P0, 10)
    r.tracker.revoke(P0)
    r.records.submit([stale])
    assert [t.state for t in r.producer.transactions] == ["aborted"]
    assert r.producer.records == [] and r.consumer.committed_offsets == {}


def test_revoking_waits_for_the_transaction_in_progress(rig):
    r = rig()
    r.producer.hold = lambda message: True  # the batch's records are not acknowledged yet
    seen: list[str] = []

    def revoke() -> None:
        with r.delivery.revoking([P0], broker_ok=True):
            seen.append(r.producer.transactions[-1].state)

    batch = threading.Thread(target=r.publish, args=(P0, [10]), daemon=True)
    revoker = threading.Thread(target=revoke, daemon=True)
    try:
        batch.start()
        wait_for(lambda: r.producer.transactions and r.producer.transactions[-1].records, what="a batch in progress")
        revoker.start()
        time.sleep(0.05)  # room for a revocation that does not wait to show
        assert seen == []
    finally:
        r.producer.hold = None
        batch.join(5)
        revoker.join(5)
    assert seen == ["committed"]


def test_the_last_member_metadata_is_kept_when_the_member_is_fenced(rig):
    r = rig()
    member = r.consumer.consumer_group_metadata()
    r.consumer.lose([P0])
    r.consumer.poll(0)
    assert not names_a_member(r.consumer.consumer_group_metadata())
    r.delivery.rebalanced()
    r.publish(P1, [0])
    assert r.producer.transactions[-1].group_metadata == member  # refused by the broker if stale: never unchecked


def test_a_fenced_producer_stops_the_service(rig):
    r = rig()
    r.producer.fail_next("commit_transaction", KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True))
    with pytest.raises(KafkaException, match="fenced"):
        r.publish(P0, [10])
    assert r.consumer.committed_offsets == {} and r.producer.records == []


def test_a_transaction_whose_partition_is_revoked_before_its_offsets_are_taken_aborts(rig, monkeypatch):
    """REVOKE_TIMEOUT ran out while the transaction was open, and the partition was forgotten before the
    transaction took its offsets: its results must not commit without them (its new owner redoes them);
    the batch's other partition is rewound and redone here."""
    r = rig()
    commit_points = r.tracker.commit_points

    def revoked_first(tps=None):
        r.tracker.revoke(P0)  # what the poll thread does once the revocation stops waiting
        return commit_points(tps)

    monkeypatch.setattr(r.tracker, "commit_points", revoked_first)
    r.records.submit([described(r.tracker, P0, 10), described(r.tracker, P1, 3)])
    assert [t.state for t in r.producer.transactions] == ["aborted"]
    assert r.consumer.committed_offsets == {}
    monkeypatch.setattr(r.tracker, "commit_points", commit_points)
    r.delivery.poll()  # the rewind of P1, on the poll thread
    assert r.position(P1) == 3  # nothing committed: back to where consuming it started


def test_a_partition_revoked_once_its_offsets_are_in_the_transaction_commits_with_them(rig):
    """Revoked while the transaction waits in commit_transaction: its offsets already went in, so results
    and offsets commit together, and the new owner's read of the offsets waits for the commit (KIP-447)."""
    r = rig()
    r.delivery.revoke_timeout = 0.05
    r.producer.hold = lambda message: True  # commit_transaction waits for the acknowledgements
    items = [described(r.tracker, P0, 10), described(r.tracker, P1, 3)]
    batch = threading.Thread(target=r.records.submit, args=(items,))
    batch.start()
    try:
        wait_for(lambda: r.producer.transactions and r.producer.transactions[-1].offsets, what="offsets sent")
        with r.delivery.revoking([P0], broker_ok=True):  # gives up waiting after 0.05 s
            r.tracker.revoke(P0)
    finally:
        r.producer.hold = None
        batch.join(5)
    (transaction,) = r.producer.transactions
    assert transaction.state == "committed" and transaction.offsets == {P0: 11, P1: 4}


def test_a_record_the_producer_cannot_encode_is_settled_by_its_fallback(rig):
    r = rig()
    r.producer.fail_next("produce", TypeError("headers: expected str or bytes"))
    r.publish(P0, [4])
    (transaction,) = r.producer.transactions
    assert transaction.state == "committed" and [m.topic() for m in transaction.records] == ["dead-letters"]
    headers = {name: value.decode() for name, value in transaction.records[0].headers()}
    assert (headers["error.stage"], headers["error.reason"]) == ("publish", "refused")
    assert transaction.offsets == {P0: 5}
