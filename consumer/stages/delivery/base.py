"""What both delivery guarantees share: producing one record, counting it, marking offsets committed."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.stages.base import FatalLatch, OutgoingRecord
from consumer.state import ServiceState

PRODUCER_LIMIT = "the producer's message.max.bytes"
REBALANCE_ERRORS = {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID}
"""Commit errors that a rebalance causes: expected, and retried."""

Send = Callable[[OutgoingRecord], "OutgoingRecord | None"]
"""Publishes one record, or its fallback when it is too large; returns what was published, or None
when the record's partition was revoked meanwhile (the record is dropped)."""


def topic_limit(topic: str) -> str:
    return f"what {topic} accepts (max.message.bytes)"


class Delivery(Protocol):
    """The last stage: publishes each submitted batch of records and commits the offsets they complete."""

    def start(self, stopping: threading.Event) -> None:
        """Prepare the producer (exactly-once: fence older instances); returns early if stopping is set."""

    def submit(self, records: list[OutgoingRecord]) -> None:
        """Publish one batch's records (from the inference thread)."""

    def poll(self, timeout: float = 0.0) -> None:
        """Poll-thread housekeeping: producer callbacks, commits (at-least-once), rewinds (exactly-once)."""

    def join(self, timeout: float) -> bool:
        """Publish what is still queued and commit it, within `timeout`; True if all of it was."""

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

    def close(self) -> None:
        return None

    def _produce(self, record: OutgoingRecord, on_delivery: Callable[..., None] | None = None) -> None:
        extra: dict[str, Any] = {"on_delivery": on_delivery} if on_delivery is not None else {}
        while True:
            try:
                self.producer.produce(record.topic, value=record.value, key=record.key, headers=record.headers, **extra)
                return
            except BufferError:
                self.producer.poll(0.5)  # the local queue is full: let acknowledgements drain it
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE and record.fallback is not None:
                    raise TooLarge() from None
                raise

    def _count(self, record: OutgoingRecord, produced_at: float) -> None:
        self.metrics.events.labels(record.outcome).inc()
        self.metrics.stage_seconds.labels("publish").observe(time.monotonic() - produced_at)
        timestamp_ms = record.source.timestamp_ms
        if timestamp_ms is not None:
            self.metrics.stage_seconds.labels("end_to_end").observe(max(time.time() - timestamp_ms / 1000, 0))

    def _committed(self, points: dict[TopicPartitionKey, int]) -> None:
        self.tracker.mark_committed(points)
        for (topic, partition), offset in points.items():
            self.metrics.committed_offset.labels(topic, str(partition)).set(offset)


class TooLarge(Exception):
    """produce() refused a record as larger than message.max.bytes, and it has a fallback."""
