"""Intake: records reach the next stage in order, a full window holds them without losing or repeating any,
partitions pause and resume with the window, and rebalances leave nothing stale behind.

Driven with a FakeConsumer and a WindowStage (the next stage refusing as resolve does); the same loop
against a real broker: tests/integration/test_delivery.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer.clients import KafkaErrors
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages import intake as intake_module
from consumer.stages.base import FatalLatch
from consumer.stages.intake import Intake
from consumer.state import ServiceState
from tests.fakes import FakeConsumer, RecordingListener, WindowStage

TOPIC = "events"
P0, P1 = (TOPIC, 0), (TOPIC, 1)


@dataclass
class Rig:
    intake: Intake
    consumer: FakeConsumer
    window: WindowStage
    tracker: OffsetTracker
    state: ServiceState
    metrics: Metrics
    latch: FatalLatch
    listener: RecordingListener

    def rounds(self, count: int) -> None:
        for _ in range(count):
            self.intake.poll_once()

    def run_until(self, condition, what: str, max_rounds: int = 200) -> None:
        """Poll rounds until `condition()`; each round waits at most a few ms in the fakes."""
        for _ in range(max_rounds):
            if condition():
                return
            self.intake.poll_once()
        raise AssertionError(f"{what} not reached in {max_rounds} rounds")

    def gauge(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


@pytest.fixture
def rig():
    def build(max_in_flight: int = 64, partitions: int = 2, records: int = 0, retry_delays: str = "") -> Rig:
        settings = Settings.from_environ({}, input_topic=TOPIC, max_in_flight=max_in_flight, retry_delays=retry_delays)
        topics = {TOPIC: partitions, **{topic: 1 for topic in settings.retry_topics()}}
        consumer = FakeConsumer({"group.id": "intake-test"}, partitions=topics)
        for partition in range(partitions):
            for n in range(records):
                consumer.append(TOPIC, partition, f"p{partition}-{n}")
        tracker, state, metrics, latch = OffsetTracker(), ServiceState(model="test"), Metrics(), FatalLatch()
        window = WindowStage(tracker, max_in_flight)
        listener = RecordingListener()
        errors = KafkaErrors(state, latch)
        intake = Intake(settings, consumer, tracker, state, metrics, latch, errors, listener, window)
        intake.subscribe(TOPIC, *settings.retry_topics())
        return Rig(intake, consumer, window, tracker, state, metrics, latch, listener)

    return build


def test_records_flow_on_in_partition_order_and_the_assignment_is_reported(rig):
    r = rig(partitions=2, records=3)
    r.run_until(lambda: len(r.window.taken) == 6, "all six records taken")
    assert r.window.offsets(P0) == [0, 1, 2] and r.window.offsets(P1) == [0, 1, 2]
    assert [record.value for record, _ in r.window.taken if record.tp == P0] == [b"p0-0", b"p0-1", b"p0-2"]
    assert r.state.in_group and r.state.assigned == ["events[0]", "events[1]"]
    assert r.gauge("diagram_assigned_partitions") == 2
    assert r.gauge("diagram_in_flight_events") == 6
    assert r.listener.rebalances == 1
    assert r.state.last_poll > 0 and r.gauge("diagram_last_poll_timestamp_seconds") == r.state.last_poll


def test_a_refused_record_is_held_and_offered_again_without_polling_for_more(rig):
    r = rig(max_in_flight=2, partitions=1, records=4)
    r.run_until(lambda: len(r.window.taken) == 2, "the window filled")
    r.rounds(2)  # the third record is polled and refused
    polls = r.consumer.polls
    r.rounds(5)
    assert r.consumer.polls == polls  # the window is full: no new record is fetched
    assert r.window.offsets(P0) == [0, 1]
    assert r.consumer.paused == set()  # not before PAUSE_AFTER_S

    r.window.finish(1)
    r.rounds(1)
    assert r.window.offsets(P0) == [0, 1, 2]  # the held record, once, in order
    r.window.finish(1)
    r.run_until(lambda: len(r.window.taken) == 4, "the last record taken")
    assert r.window.offsets(P0) == [0, 1, 2, 3]


def test_a_full_window_pauses_every_partition_and_resumes_them_at_half(rig, monkeypatch):
    monkeypatch.setattr(intake_module, "PAUSE_AFTER_S", 0.0)
    r = rig(max_in_flight=4, partitions=2, records=5)
    r.run_until(lambda: r.consumer.paused == {P0, P1}, "the partitions paused")
    assert len(r.window.taken) == 4
    assert r.state.paused == ["events[0]", "events[1]"] and r.gauge("diagram_paused_partitions") == 2

    polls = r.consumer.polls
    r.rounds(3)
    assert r.consumer.polls > polls  # paused, the consumer is still polled (group membership)
    assert len(r.window.taken) == 4

    r.window.finish(1)  # 3 in flight: the held record goes in, the window is full again
    r.rounds(2)
    assert len(r.window.taken) == 5 and r.consumer.paused == {P0, P1}
    r.window.finish(1)  # 3 in flight: room, but not yet half of MAX_IN_FLIGHT
    r.rounds(2)
    assert r.consumer.paused == {P0, P1} and len(r.window.taken) == 5
    r.window.finish(1)  # 2 in flight: half
    r.rounds(1)
    assert r.consumer.paused == set() and r.state.paused == [] and r.gauge("diagram_paused_partitions") == 0
    r.run_until(lambda: len(r.window.taken) == 7, "records flow again")


def test_a_held_record_of_a_revoked_partition_is_dropped(rig, monkeypatch):
    monkeypatch.setattr(intake_module, "PAUSE_AFTER_S", 0.0)
    r = rig(max_in_flight=1, partitions=2, records=0)
    r.consumer.append(TOPIC, 0, b"first")
    r.consumer.append(TOPIC, 0, b"second")
    r.run_until(lambda: r.consumer.paused == {P0, P1}, "the second record held and the partitions paused")
    assert r.window.offsets(P0) == [0]

    tracked_while_revoking: list[bool] = []
    r.listener.inside = lambda tps: tracked_while_revoking.append(r.tracker.epoch_of(P0) is not None)
    r.consumer.revoke([P0])
    r.rounds(3)
    assert tracked_while_revoking == [True]  # the delivery keeps what it may before the work is forgotten
    r.consumer.append(TOPIC, 1, b"other partition")
    r.run_until(lambda: r.window.offsets(P1) == [0], "the other partition's record taken")
    assert r.window.offsets(P0) == [0]  # the held record went with its partition
    assert r.listener.revocations == [([P0], True, False)]
    assert r.state.assigned == ["events[1]"] and r.gauge("diagram_assigned_partitions") == 1
    assert P0 not in r.consumer.paused  # a pause would outlive the assignment


def test_a_held_record_of_a_rewound_partition_is_dropped_and_read_again_once(rig):
    r = rig(max_in_flight=1, partitions=1, records=2)
    r.run_until(lambda: len(r.window.taken) == 1, "the first record taken")
    r.rounds(2)  # the second is held
    # What exactly-once delivery does after an aborted transaction: a new epoch, the position moved back.
    r.tracker.assign(P0)
    r.consumer.seek(TopicPartition(TOPIC, 0, 0))
    r.run_until(lambda: len(r.window.taken) == 2, "the rewound partition read again")
    r.window.finish(1)
    r.run_until(lambda: len(r.window.taken) == 3, "the rest read")
    r.rounds(3)
    assert r.window.offsets(P0) == [0, 0, 1]  # offset 1 once: the stale held copy was dropped


def test_on_assign_resumes_a_partition_paused_in_an_earlier_assignment(rig):
    r = rig(partitions=2, records=0)
    r.consumer.pause([TopicPartition(TOPIC, 1)])  # librdkafka keeps this across assignments
    r.consumer.append(TOPIC, 1, b"waiting")
    r.run_until(lambda: r.window.offsets(P1) == [0], "the record of the previously paused partition")
    assert r.consumer.paused == set()


def test_a_partition_assigned_while_the_window_is_full_waits_paused(rig, monkeypatch):
    monkeypatch.setattr(intake_module, "PAUSE_AFTER_S", 0.0)
    r = rig(max_in_flight=2, partitions=1, records=3)
    r.run_until(lambda: r.consumer.paused == {P0}, "the window full and paused")
    r.consumer.append(TOPIC, 1, b"new partition")
    r.consumer.grant([P1])
    r.rounds(3)
    assert r.consumer.paused == {P0, P1} and r.window.offsets(P1) == []
    assert r.state.assigned == ["events[0]", "events[1]"]
    r.window.finish(2)
    r.run_until(lambda: r.window.offsets(P1) == [0], "the new partition's record after the window emptied")


def test_lost_partitions_are_forgotten_as_lost_and_nothing_is_kept_after_a_fatal_error(rig):
    r = rig(partitions=2, records=1)
    r.run_until(lambda: len(r.window.taken) == 2, "both records taken")
    r.consumer.lose([P0])
    r.rounds(1)
    assert r.listener.revocations == [([P0], True, True)]
    assert r.tracker.assigned() == [P1] and r.state.assigned == ["events[1]"]

    r.latch.trip(RuntimeError("inference thread died"))
    r.consumer.revoke([P1])
    r.rounds(1)
    assert len(r.listener.revocations) == 1  # after an unhandled error the delivery keeps nothing
    assert r.tracker.assigned() == [] and r.state.assigned == []


def test_a_fatal_consumer_error_stops_the_loop(rig):
    r = rig(partitions=1, records=0)
    r.consumer.push_error(KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True))
    with pytest.raises(KafkaException, match="fenced"):
        r.rounds(2)


def test_end_of_partition_is_ignored_and_other_errors_are_logged(rig, caplog):
    r = rig(partitions=1, records=0)
    r.consumer.push_error(KafkaError(KafkaError._PARTITION_EOF), TOPIC, 0)
    with caplog.at_level(logging.WARNING, logger="consumer.clients"):
        r.rounds(2)
        assert "consumer error" not in caplog.text
        r.consumer.push_error(KafkaError(KafkaError._TRANSPORT, "broker went away"))
        r.rounds(2)
    assert "consumer error" in caplog.text and "broker went away" in caplog.text
    r.consumer.append(TOPIC, 0, b"after the errors")
    r.run_until(lambda: r.window.offsets(P0) == [0], "a record after the errors")


# -- retry records waiting for their due time (RETRY_DELAYS) ----------------------------------------------
RETRY = ("events-retry-60s", 0)


class Clock:
    """Wall-clock time as intake reads it (due times are epoch ms), moved by the test; monotonic is real."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(intake_module, "time", clock)
    return clock


def add_retry(r: Rig, value: str, due_in_s: float, clock: Clock) -> None:
    due_ms = int((clock.now + due_in_s) * 1000)
    r.consumer.append(RETRY[0], RETRY[1], value, headers=[("retry.due", str(due_ms)), ("retry.attempt", "2")])


def test_a_retry_record_not_due_waits_paused_while_the_other_partitions_flow(rig, clock):
    r = rig(partitions=2, retry_delays="1m")
    add_retry(r, "retry-a", 60, clock)
    add_retry(r, "retry-b", 60, clock)
    r.run_until(lambda: r.state.waiting, "the retry record waiting")
    assert RETRY in r.consumer.paused and r.state.waiting == ["events-retry-60s[0]"]
    assert r.gauge("diagram_waiting_partitions") == 1
    for n in range(3):
        r.consumer.append(TOPIC, n % 2, f"input-{n}")
    r.run_until(lambda: len(r.window.taken) == 3, "the input records taken meanwhile")
    r.rounds(5)
    assert r.window.offsets(RETRY) == [] and r.state.paused == []
    assert r.tracker.in_flight() == 3  # the waiting record holds no slot...
    assert RETRY not in r.tracker.commit_points()  # ...and nothing of its partition is committable past it

    clock.now += 60
    r.run_until(lambda: len(r.window.offsets(RETRY)) == 2, "both retry records taken once due")
    assert [record.value for record, _ in r.window.taken if record.tp == RETRY] == [b"retry-a", b"retry-b"]
    assert RETRY not in r.consumer.paused and r.state.waiting == [] and r.gauge("diagram_waiting_partitions") == 0


def test_a_retry_record_already_due_goes_on_at_once(rig, clock):
    r = rig(partitions=1, retry_delays="1m")
    add_retry(r, "overdue", -5, clock)
    r.run_until(lambda: r.window.offsets(RETRY) == [0], "the overdue record taken")
    assert r.consumer.paused == set() and r.state.waiting == []


def test_records_after_a_waiting_one_never_overtake_it(rig, clock):
    """librdkafka may still hand over a record it fetched before the pause: it waits behind the first."""
    r = rig(partitions=1, retry_delays="1m")
    add_retry(r, "first", 60, clock)
    r.run_until(lambda: r.state.waiting, "the first waiting")
    add_retry(r, "second, due earlier", -1, clock)
    r.consumer.resume([TopicPartition(*RETRY)])  # as if it had been fetched before the pause took effect
    r.run_until(lambda: len(r.intake._waiting.get(RETRY, ())) == 2, "the second held behind the first")
    assert r.window.offsets(RETRY) == []
    clock.now += 60
    r.run_until(lambda: len(r.window.offsets(RETRY)) == 2, "both taken")
    assert [record.value for record, _ in r.window.taken] == [b"first", b"second, due earlier"]


def test_the_window_resuming_its_partitions_leaves_a_waiting_one_paused(rig, clock, monkeypatch):
    monkeypatch.setattr(intake_module, "PAUSE_AFTER_S", 0.0)
    r = rig(max_in_flight=2, partitions=1, records=4, retry_delays="1m")
    add_retry(r, "later", 60, clock)
    r.run_until(lambda: r.consumer.paused == {(TOPIC, 0), RETRY} and r.state.paused, "window full, retry waiting")
    r.window.finish(2)
    r.run_until(lambda: (TOPIC, 0) not in r.consumer.paused, "the window's resume")
    r.rounds(3)
    assert RETRY in r.consumer.paused and r.state.waiting == ["events-retry-60s[0]"]
    r.window.finish(2)
    clock.now += 60
    r.run_until(lambda: r.window.offsets(RETRY) == [0], "the retry record once due")
    assert RETRY not in r.consumer.paused


def test_a_record_coming_due_leaves_its_partition_paused_while_the_window_is_full(rig, clock, monkeypatch):
    monkeypatch.setattr(intake_module, "PAUSE_AFTER_S", 0.0)
    r = rig(max_in_flight=2, partitions=1, retry_delays="1m")
    add_retry(r, "due soon", 60, clock)
    r.run_until(lambda: r.state.waiting, "the retry record waiting")
    for n in range(4):
        r.consumer.append(TOPIC, 0, f"input-{n}")
    r.run_until(lambda: r.state.paused, "the window full and everything paused")
    clock.now += 60
    r.rounds(3)
    assert r.state.waiting == [] and RETRY in r.consumer.paused  # due, but the window still holds it back
    assert r.window.offsets(RETRY) == []
    r.window.finish(2)
    r.run_until(lambda: r.window.offsets(RETRY) == [0], "the retry record taken once the window has room")


def test_a_waiting_partition_that_is_revoked_or_rewound_lets_its_record_go(rig, clock):
    r = rig(partitions=1, retry_delays="1m")
    add_retry(r, "waiting", 60, clock)
    r.run_until(lambda: r.state.waiting, "the retry record waiting")
    # rewound (exactly-once, after an aborted transaction): a new epoch, the position moved back
    r.tracker.assign(RETRY)
    r.consumer.seek(TopicPartition(*RETRY, 0))
    r.rounds(2)
    assert len(r.intake._waiting[RETRY]) == 1  # the stale copy dropped, the record read again and waiting
    r.consumer.revoke([RETRY])
    r.run_until(lambda: not r.state.waiting, "the revocation")
    assert RETRY not in r.consumer.paused and r.intake._waiting == {}  # no pause outlives the assignment
    r.consumer.grant([RETRY])
    clock.now += 60
    r.run_until(lambda: r.window.offsets(RETRY) == [0], "the record read again by its next owner, once")
    r.rounds(3)
    assert r.window.offsets(RETRY) == [0]
