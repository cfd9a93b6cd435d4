"""What both delivery guarantees share: producing one record, counting it, marking offsets committed."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.stages.base import PRODUCER_LIMIT, FatalLatch, OutgoingRecord, topic_limit
from consumer.state import ServiceState

RECORD_REFUSALS = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD}
"""Delivery errors that are about the record, not the broker: the broker will never take it (too large
for the topic, or a record the topic's configuration rejects, such as no key on a compacted topic)."""


def broker_refusal(record: OutgoingRecord, error: KafkaError | None) -> str | None:
    """Why the broker refused `record` for good, when it did and the record has a fallback; else None."""
    if error is None or record.fallback is None or error.code() not in RECORD_REFUSALS:
        return None
    if error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return topic_limit(record.topic)
    return f"{record.topic} refused it: {error.str()}"


REBALANCE_ERRORS = {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID}
"""Commit errors that a rebalance causes: expected, and retried."""

QUEUE_FULL_WAIT_S = 600.0
"""How long a produce() waits for room in the producer's full local queue (librdkafka's
queue.buffering.max.*); past message.timeout.ms (300 s by default) queued records fail and free it."""

Send = Callable[[OutgoingRecord], "OutgoingRecord | None"]
"""Publishes one record, or its fallback when it is too large; returns what was published, or None
when the record's partition was revoked meanwhile (the record is dropped)."""


class Delivery(Protocol):
    """The last stage: publishes each submitted batch of records and commits the offsets they complete."""

    def start(self, stopping: threading.Event) -> None:
        """Prepare the producer (exactly-once: fence older instances); returns early if stopping is set."""

    def submit(self, records: list[OutgoingRecord]) -> None:
        """Publish one batch's records (from the inference thread)."""

    def poll(self, timeout: float = 0.0) -> None:
        """Poll-thread housekeeping: producer callbacks, commits (at-least-once), rewinds (exactly-once)."""

    def join(self, timeout: float, between: Callable[[], None] | None = None) -> bool:
        """Publish what is still queued and commit it, within `timeout`; True if all of it was.
        `between` attempts at a refused commit: one round of serving the group's callbacks."""

    def close(self) -> None:
        """Nothing more is submitted."""

    def rebalanced(self) -> None:
        """Called on the poll thread after every assignment change."""

    def revoking(
        self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False
    ) -> AbstractContextManager[None]:
        """Around forgetting revoked (or lost) partitions: keep what was published for them, no more."""

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The consumer's offset-commit callback."""


class DeliveryBase:
    def __init__(
        self,
        producer: Producer,
        consumer: Consumer,
        tracker: OffsetTracker,
        metrics: Metrics,
        latch: FatalLatch,
        state: ServiceState,
    ) -> None:
        self.producer, self.consumer, self.tracker, self.metrics = producer, consumer, tracker, metrics
        self.latch, self.state = latch, state
        self._shutdown_deadline: float | None = None
        """Set by `join`: the monotonic time after which the shutdown waits for nothing more."""

    def _revocation_wait(self, limit: float) -> float:
        """Seconds a revocation may wait: `limit`, and while shutting down no more than what is left of it."""
        if self._shutdown_deadline is None:
            return limit
        return min(limit, max(self._shutdown_deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        return None

    def _produce(self, record: OutgoingRecord, on_delivery: Callable[..., None] | None = None) -> None:
        """Hand `record` to the producer. `Refused` when the producer will not take this record (too
        large, or headers it cannot encode) and the record has a fallback; a full local queue is waited
        out for up to QUEUE_FULL_WAIT_S (it drains as the broker acknowledges, or as records time out
        after message.timeout.ms), and then is the replica's fault."""
        extra: dict[str, Any] = {"on_delivery": on_delivery} if on_delivery is not None else {}
        deadline = time.monotonic() + QUEUE_FULL_WAIT_S
        while True:
            try:
                self.producer.produce(record.topic, value=record.value, key=record.key, headers=record.headers, **extra)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the producer's local queue stayed full for {QUEUE_FULL_WAIT_S:.0f} s: the broker is not "
                        "acknowledging records"
                    ) from None
                self.producer.poll(0.5)  # the local queue is full: let acknowledgements drain it
            except KafkaException as exc:
                error = exc.args[0]
                if record.fallback is None or error.fatal():
                    raise
                if error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise Refused(PRODUCER_LIMIT) from None
                raise Refused(f"the producer refused it: {error.str()}") from None
            except (TypeError, ValueError, UnicodeError) as exc:  # what confluent-kafka raises for bad fields
                if record.fallback is None:
                    raise
                raise Refused(f"the producer refused it: {type(exc).__name__}: {exc}") from None

    def _count(self, record: OutgoingRecord, produced_at: float) -> None:
        if not record.settles_input:
            return  # a result cache entry: not an event's outcome
        if record.on_settled is not None:
            record.on_settled(record, produced_at)
        self.metrics.events.labels(record.outcome).inc()
        self.metrics.stage_seconds.labels("publish").observe(time.monotonic() - produced_at)
        timestamp_ms = record.source.timestamp_ms
        if timestamp_ms is not None:
            self.metrics.stage_seconds.labels("end_to_end").observe(max(time.time() - timestamp_ms / 1000, 0))

    def _committed(self, points: dict[TopicPartitionKey, int]) -> None:
        self.tracker.mark_committed(points)
        for (topic, partition), offset in points.items():
            self.metrics.committed_offset.labels(topic, str(partition)).set(offset)


class Refused(Exception):
    """produce() refused a record that has a fallback; the argument says why."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
