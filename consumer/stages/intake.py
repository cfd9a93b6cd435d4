"""Intake: the poll loop's side of the pipeline. Polls the consumer, offers each record to the next stage,
pauses and resumes partitions for flow control, and answers the group's rebalances.

The poll loop never waits for the model. When the next stage refuses a record (the in-flight window is
full), intake keeps it and takes no new record, calling only `poll` down the chain (which wakes on the
acknowledgement that frees a slot). If the window is still full PAUSE_AFTER_S later it pauses every
assigned partition and goes on polling, so a long batch never costs a rebalance: librdkafka drops
prefetched records on pause() and fetches again about a second after resume(), and pausing at once
capped an ENGINE=echo replica near 135 events/s (bench/pipeline.py).

Records of the retry topics (RETRY_DELAYS, consumer/stages/retry.py) wait for their due time without
holding a slot or blocking any other partition: a record polled before it is due is kept here, its
partition paused, and it goes on once due (then the partition is resumed, and librdkafka fetches again
from the record after it). Its offset is not tracked meanwhile, so no commit passes it. A retry topic's
records share one delay, so they come due in offset order and the first one not due stops its
partition. The two kinds of pause compose: a partition paused for a due time is not resumed when the
window frees, and one paused for the window is not resumed when its record comes due.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import AbstractContextManager
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.clients import KafkaErrors
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.settings import Settings
from consumer.stages.base import FatalLatch, InputRecord, MessageRejected, Stage
from consumer.stages.retry import RetryPolicy
from consumer.state import ServiceState

logger = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.2
PAUSE_AFTER_S = 2.0
"""How long the in-flight window stays full before the partitions are paused (see the module doc)."""
WAKE_S = 0.05
"""While the window is full: how long one round waits downstream for room."""


class RebalanceListener(Protocol):
    """What must happen around a rebalance besides intake's own bookkeeping (the delivery's part)."""

    def rebalanced(self) -> None:
        """After every assignment change."""

    def revoking(
        self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False
    ) -> AbstractContextManager[None]:
        """Around forgetting revoked (or lost) partitions: keep what was published for them, no more."""


class Intake:
    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        tracker: OffsetTracker,
        state: ServiceState,
        metrics: Metrics,
        latch: FatalLatch,
        errors: KafkaErrors,
        listener: RebalanceListener,
        next_stage: Stage[InputRecord],
    ) -> None:
        self.settings, self.consumer, self.tracker = settings, consumer, tracker
        self.state, self.metrics, self.latch, self.errors = state, metrics, latch, errors
        self.listener, self.next = listener, next_stage
        self._held: deque[tuple[InputRecord, int | None]] = deque()
        """Records the next stage refused, with their partition's epoch when they were polled."""
        self._paused: set[TopicPartitionKey] | None = None  # None: flowing; a set: the window is full
        self._full_since: float | None = None  # when the next stage first refused a record
        self.retries = RetryPolicy(settings)
        self._waiting: dict[TopicPartitionKey, deque[tuple[InputRecord, int | None]]] = {}
        """Retry records polled before they are due, per partition (paused until the first is due), with
        their partition's epoch when they were polled."""

    def subscribe(self, topic: str, *more: str) -> None:
        """Subscribe to `topic` and `more` (the input topic and its retry topics) in one group."""
        self.consumer.subscribe(
            [topic, *more], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # -- the loop ----------------------------------------------------------------------------------
    def poll_once(self) -> None:
        """One round of the poll loop."""
        self.next.poll(0)
        if self._held and self._paused is None:
            message = None  # the window is full: take no record yet (see PAUSE_AFTER_S)
            self.next.poll(WAKE_S)
        else:
            message = self.consumer.poll(POLL_TIMEOUT_S)
        self.state.last_poll = time.time()
        self.metrics.last_poll.set(self.state.last_poll)
        if message is not None:
            error = message.error()
            if error is not None:
                self._on_message_error(error)
            else:
                record = InputRecord.from_message(message)
                epoch = self.tracker.epoch_of(record.tp)
                if not self._wait_if_early(record, epoch):
                    self._held.append((record, epoch))
        self._release_due()
        self._offer()
        self._flow_control()

    def keep_membership(self) -> None:
        """A round while shutting down: no new records (everything is paused), callbacks still served."""
        self.next.poll(WAKE_S)
        self.consumer.poll(WAKE_S)  # records of paused partitions are not returned; any other is ignored

    def _offer(self) -> None:
        while self._held:
            record, epoch = self._held[0]
            if self.tracker.epoch_of(record.tp) != epoch:
                self._held.popleft()  # revoked or rewound since it was polled: it will be read again
                continue
            try:
                self.next.submit(record)
            except MessageRejected:
                self._full_since = self._full_since or time.monotonic()
                return
            self._held.popleft()
        self._full_since = None

    # -- retry records waiting for their due time ----------------------------------------------------
    def _wait_if_early(self, record: InputRecord, epoch: int | None) -> bool:
        """Keep `record` if it is a retry record not due yet, or its partition already has one waiting
        (it must not overtake it); the partition is paused until then. False: it may go on now."""
        waiting = self._waiting.get(record.tp)
        if waiting is None:
            due_ms = self.retries.due_ms(record)
            if due_ms is None or due_ms <= time.time() * 1000:
                return False
            # librdkafka drops what it prefetched for a paused partition and, once resumed, fetches from
            # the record after the last one returned: this one is kept here until it is due.
            self.consumer.pause([TopicPartition(record.topic, record.partition)])
            waiting = self._waiting[record.tp] = deque()
            logger.info("%s is due in %.1f s: its partition waits, paused", record, due_ms / 1000 - time.time())
            self._report_waiting()
        waiting.append((record, epoch))
        return True

    def _release_due(self) -> None:
        """Hand on the waiting records that are due, in order; resume a partition none waits on any more
        (unless the window keeps it paused). Records of a partition revoked or rewound since are dropped:
        they will be read again."""
        if not self._waiting:
            return
        now_ms = time.time() * 1000
        for tp, waiting in list(self._waiting.items()):
            while waiting:
                record, epoch = waiting[0]
                if self.tracker.epoch_of(tp) != epoch:
                    waiting.popleft()
                    continue
                due_ms = self.retries.due_ms(record)
                if due_ms is not None and due_ms > now_ms:
                    break
                self._held.append(waiting.popleft())
            if not waiting:
                del self._waiting[tp]
                if self._paused is None or tp not in self._paused:
                    self.consumer.resume([TopicPartition(tp[0], tp[1])])
                self._report_waiting()

    def _report_waiting(self) -> None:
        self.state.waiting = sorted(f"{t}[{p}]" for t, p in self._waiting)
        self.metrics.waiting_partitions.set(len(self._waiting))

    def _on_message_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        self.errors.log("consumer error: %s", error)

    # -- flow control ------------------------------------------------------------------------------
    def _flow_control(self) -> None:
        in_flight = self.tracker.in_flight()
        self.metrics.in_flight.set(in_flight)
        if self._full_since is not None:
            if self._paused is not None or time.monotonic() - self._full_since >= PAUSE_AFTER_S:
                self.pause_all()  # partitions assigned while the window is full wait too
            return
        if self._paused is not None and not self.state.stopping and in_flight <= self.settings.max_in_flight // 2:
            flowing = self._paused - set(self._waiting)  # those waiting for a due time stay paused
            if flowing:
                self.consumer.resume([TopicPartition(t, p) for t, p in flowing])
            self._paused = None
            self.state.paused = []
            self.metrics.paused_partitions.set(0)
        elif self._paused is not None:
            self.pause_all()

    def pause_all(self) -> None:
        paused = self._paused or set()
        assignment = {(p.topic, p.partition) for p in self.consumer.assignment()}
        new = assignment - paused
        if new:
            self.consumer.pause([TopicPartition(t, p) for t, p in new])
        self._paused = paused | new
        self.state.paused = sorted(f"{t}[{p}]" for t, p in self._paused)
        self.metrics.paused_partitions.set(len(self._paused))

    # -- rebalances --------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self.tracker.assign((partition.topic, partition.partition))
        if partitions and self._paused is None:
            # librdkafka keeps a pause across unassign and assign (2.16, measured): a partition this
            # member paused in an earlier assignment would otherwise never be fetched again.
            consumer.resume([TopicPartition(p.topic, p.partition) for p in partitions])
        self.state.in_group = True
        self._refresh_assignment(consumer, extra=[(p.topic, p.partition) for p in partitions])
        self.listener.rebalanced()
        logger.info("assigned %s", [f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget(tps, lost=False)  # what was published for them is committed first
        self._release_paused(consumer, tps)
        self._refresh_assignment(consumer, removed=tps)
        logger.info("revoked %s", [f"{t}[{p}]" for t, p in tps])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget(tps, lost=True)  # no commit: they already belong to someone else
        self._release_paused(consumer, tps)
        self._refresh_assignment(consumer, removed=tps)
        logger.warning("partitions lost: %s", [f"{t}[{p}]" for t, p in tps])

    def _forget(self, tps: list[TopicPartitionKey], lost: bool) -> None:
        """Drop the partitions' in-flight work, after the delivery kept what it may for them."""
        if self.latch.tripped():
            for tp in tps:
                self.tracker.revoke(tp)  # after an unhandled error nothing more is committed
            return
        with self.listener.revoking(tps, self.state.broker_ok, lost=lost):
            for tp in tps:
                self.tracker.revoke(tp)

    def _release_paused(self, consumer: Consumer, tps: list[TopicPartitionKey]) -> None:
        """Resume partitions that leave while paused: the pause would outlive the assignment. Their
        waiting retry records are dropped: the partition's next owner reads them again."""
        waiting = set(self._waiting) & set(tps)
        for tp in waiting:
            del self._waiting[tp]
        if waiting:
            self._report_waiting()
        leaving = waiting | (self._paused & set(tps) if self._paused is not None else set())
        if leaving:
            consumer.resume([TopicPartition(t, p) for t, p in leaving])
        if self._paused is not None:
            self._paused -= leaving

    def _refresh_assignment(
        self,
        consumer: Consumer,
        extra: list[TopicPartitionKey] | None = None,
        removed: list[TopicPartitionKey] | None = None,
    ) -> None:
        current = {(p.topic, p.partition) for p in consumer.assignment()} | set(extra or [])
        current -= set(removed or [])
        self.state.assigned = sorted(f"{t}[{p}]" for t, p in current)
        self.metrics.assigned_partitions.set(len(current))
