"""At-least-once (the default): each input offset is committed once the broker has acknowledged its
result or dead letter.

Each record is produced with a delivery callback, and its input offset is marked done only when the
broker has acknowledged it. The poll thread commits, per partition, the offset below which everything
is done (`OffsetTracker`), asynchronously and often. Before partitions go (a revocation, the
shutdown) it commits once more and waits for the answer, sending again every point the broker has not
acknowledged: an asynchronous commit queued behind a rebalance is refused late, for its stale
generation, and must not count as done. The shutdown waits for those answers only until its deadline,
and a revocation while shutting down (a rebalance, or leaving the group at the end) waits at most for
what is left of it: a broker that stopped answering (up to socket.timeout.ms for a synchronous commit)
does not hold the process past SHUTDOWN_TIMEOUT. A record the producer cannot deliver within
`message.timeout.ms` is fatal: the service stops without committing its input, and another member
redoes it.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from consumer.offsets import TopicPartitionKey
from consumer.stages.base import OutgoingRecord
from consumer.stages.delivery.base import REBALANCE_ERRORS, DeliveryBase, Refused, broker_refusal

logger = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.5
"""How often the poll thread commits what has been acknowledged."""
REVOKE_FLUSH_S = 5.0
"""How long a revocation waits for acknowledgements of results already produced."""


class AtLeastOnce(DeliveryBase):
    """Produce with delivery callbacks; the poll thread commits what the broker acknowledged."""

    _last_commit = 0.0

    def start(self, stopping: threading.Event) -> None:
        return None

    def rebalanced(self) -> None:
        return None

    def submit(self, records: list[OutgoingRecord]) -> None:
        for record in records:
            if self._send(record) is record:
                record.log_produced()

    def poll(self, timeout: float = 0.0) -> None:
        self.producer.poll(timeout)
        self.tick()

    def _send(self, record: OutgoingRecord) -> OutgoingRecord | None:
        if not self.tracker.is_current(record.source_tp, record.epoch):
            return None
        try:
            self._produce(record, self._on_delivery(record))
        except Refused as refusal:
            assert record.fallback is not None
            logger.warning("producer refused %s for %s: %s", record.outcome, record.source, refusal.why)
            return self._send(record.fallback(refusal.why))
        return record

    def _on_delivery(self, record: OutgoingRecord) -> Callable[[KafkaError | None, Message], None]:
        tp, offset, epoch = record.source_tp, record.source.offset, record.epoch
        produced_at = time.monotonic()  # the handler is made just before its produce() call

        def on_delivery(error: KafkaError | None, _published: Message) -> None:
            if not record.settles_input:
                # A result cache entry: its input is settled by its result, and a lost entry costs a
                # generation later, never the event.
                if error is not None:
                    logger.warning("could not publish a result cache entry for %s: %s", record.source, error)
                return
            why = broker_refusal(record, error)
            if why is not None:
                assert record.fallback is not None
                logger.warning("broker refused %s for %s: %s", record.outcome, record.source, why)
                self._send(record.fallback(why))  # settles the input instead
                return
            if error is not None:
                # The producer already retried for message.timeout.ms: this input must not be
                # committed, and this member stops so that another one takes the partition over.
                logger.error("could not publish %s for %s[%d]@%d: %s", record.outcome, tp[0], tp[1], offset, error)
                self.latch.trip(KafkaException(error))
                return
            if self.tracker.done(tp, offset, epoch):
                self._count(record, produced_at)

        return on_delivery

    def tick(self) -> None:
        if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self.commit()

    def commit(self, tps: list[TopicPartitionKey] | None = None, wait: bool = False) -> bool:
        """Commit what is done. Asynchronous unless `wait`: a synchronous commit blocks the poll
        loop for up to session.timeout.ms while the coordinator is unreachable or a rebalance holds
        the request, and sends again every point the broker has not acknowledged yet."""
        self._last_commit = time.monotonic()
        if self.latch.tripped():
            return False  # after an unhandled error nothing more is committed
        points = self.tracker.commit_points(tps, unacknowledged=wait)
        if not points:
            return True
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in points.items()]
        try:
            if not wait:
                self.consumer.commit(offsets=offsets, asynchronous=True)
                self.tracker.mark_sent(points)  # acknowledged (or refused) in on_commit
                return True
            answered = self.consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as exc:
            logger.warning("commit failed (will retry): %s", exc.args[0])
            return False
        refused = [(p.topic, p.partition) for p in answered if p.error is not None]
        self._committed({tp: point for tp, point in points.items() if tp not in refused})
        if refused:
            self.tracker.commit_failed(refused)
            logger.warning("commit refused for %s", refused)
            return False
        return True

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        refused = [p for p in partitions if error is not None or p.error is not None]
        if error is None:
            self._committed({(p.topic, p.partition): p.offset for p in partitions if p.error is None and p.offset >= 0})
        if refused:
            self.tracker.commit_failed([(p.topic, p.partition) for p in refused])  # committed again next tick
            cause = error or refused[0].error
            # A commit sent just before a rebalance carries the old generation: expected, and retried.
            level = logging.INFO if cause is not None and cause.code() in REBALANCE_ERRORS else logging.WARNING
            logger.log(
                level,
                "offset commit failed for %s (will retry): %s",
                [f"{p.topic}[{p.partition}]" for p in refused],
                cause,
            )

    @contextmanager
    def revoking(self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False) -> Iterator[None]:
        if not self.latch.tripped() and not lost:
            wait = self._revocation_wait(REVOKE_FLUSH_S)
            if wait > 0:
                self.producer.flush(wait)  # results already produced get acknowledged...
                self.commit(tps, wait=broker_ok)  # ...and their inputs committed before the partitions go
            else:
                self.commit(tps)  # past the shutdown's deadline (leaving the group after `join`): sent, not waited for
        yield

    def join(self, timeout: float, between: Callable[[], None] | None = None) -> bool:
        """Publish what is queued and commit it, waiting for the broker's answers until `timeout` has passed.

        The commits are asynchronous and answered in `between` (default: a consumer poll, which returns
        no records while every partition is paused, as they are at shutdown), so a broker that stopped
        answering costs no more than the deadline. A refused commit is sent again.
        """
        deadline = time.monotonic() + timeout
        self._shutdown_deadline = deadline
        unsent = self.producer.flush(max(timeout, 0.5))
        if unsent:
            logger.warning("%d records were not acknowledged before the shutdown deadline", unsent)
        while True:
            if self.latch.tripped():
                return False
            if not self.state.broker_ok:
                logger.warning("broker unreachable at shutdown: the last offsets are not committed")
                return False
            if not self.tracker.commit_points(unacknowledged=True):
                return unsent == 0  # everything acknowledged is committed
            # Sends what is done and not yet sent, even at the deadline (a flush that took all of it still
            # leaves the acknowledged part to commit); a point refused meanwhile (most often by a rebalance
            # under way: the request waited behind it and carried the old generation) counts as unsent again.
            self.commit()
            if time.monotonic() >= deadline:
                logger.warning("the last offsets were not committed before the shutdown deadline")
                return False
            (between or self._serve_callbacks)()

    def _serve_callbacks(self) -> None:
        self.consumer.poll(0.1)
