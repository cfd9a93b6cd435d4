"""Intake: the poll loop's side of the pipeline. Polls the consumer, offers each record to the next stage,
pauses and resumes partitions for flow control, and answers the group's rebalances.

The poll loop never waits for the model. When the next stage refuses a record (the in-flight window is
full), intake keeps it and takes no new record, calling only `poll` down the chain (which wakes on the
acknowledgement that frees a slot). If the window is still full PAUSE_AFTER_S later it pauses every
assigned partition and goes on polling, so a long batch never costs a rebalance: librdkafka drops
prefetched records on pause() and fetches again about a second after resume(), and pausing at once
capped an ENGINE=echo replica near 135 events/s (bench/pipeline.py).
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

    def subscribe(self, topic: str) -> None:
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

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
                self._held.append((record, self.tracker.epoch_of(record.tp)))
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
            self.consumer.resume([TopicPartition(t, p) for t, p in self._paused])
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
        """Resume partitions that leave while paused: the pause would outlive the assignment."""
        if self._paused is None:
            return
        leaving = self._paused & set(tps)
        if leaving:
            consumer.resume([TopicPartition(t, p) for t, p in leaving])
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
