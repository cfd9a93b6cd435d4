"""What the stages share: the one interface, the fatal-error latch, and the work that travels between them.

The pipeline is a chain (consumer/pipeline.py wires it):

    intake ──InputRecord──> resolve ──WorkItem──> infer ──[Outcome]──> records ──[OutgoingRecord]──> delivery

Each stage hands its output to the next one's `submit`, and refuses work it cannot take yet by
raising `MessageRejected`; the caller keeps that work and offers it again (Arroyo's processing
strategies are the model). `poll` is called by the poll loop on every round and passed down the
chain, so a stage that has housekeeping (delivery: producer callbacks and commits) gets it without a
thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar

from confluent_kafka import Message

from consumer.engine.base import Generation
from consumer.errors import ProcessingError
from consumer.events import CacheStatus, DiagramEvent
from consumer.images import LoadedImage
from consumer.logs import event_fields
from consumer.offsets import TopicPartitionKey

logger = logging.getLogger(__name__)

T_contra = TypeVar("T_contra", contravariant=True)

TOO_LARGE = "too large for "
"""How a refusal for size begins (see `OutgoingRecord.fallback`)."""
PRODUCER_LIMIT = TOO_LARGE + "the producer's message.max.bytes"


CACHE_OUTCOME = "cache"
"""`OutgoingRecord.outcome` of a result cache entry (consumer/result_cache/)."""


def topic_limit(topic: str) -> str:
    return f"{TOO_LARGE}what {topic} accepts (max.message.bytes)"


class MessageRejected(Exception):
    """A stage cannot take this work now: keep it, and offer it again later (back-pressure)."""


class Stage(Protocol[T_contra]):
    def submit(self, work: T_contra) -> None:
        """Take `work`, or raise `MessageRejected` to be offered it again later."""

    def poll(self, timeout: float = 0.0) -> None:
        """Housekeeping on the poll loop's thread, passed down the chain; may wait up to `timeout` for
        progress downstream (an acknowledgement that frees room)."""

    def join(self, timeout: float) -> bool:
        """Finish what was already taken (shutdown), waiting up to `timeout`; True when all of it is done."""

    def close(self) -> None:
        """Take no more work; let threads and clients go without waiting for them."""


class FatalLatch:
    """The first unrecoverable error of any thread. Once tripped, nothing more is committed, the poll
    loop stops, and the replica exits for the group to redo its uncommitted work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def trip(self, error: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = error

    def tripped(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        return self._error


@dataclass(frozen=True)
class InputRecord:
    """An input record as the stages see it: a consumed `confluent_kafka.Message`'s fields, typed."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    """The record's Kafka timestamp; None when the broker gave none."""
    headers: tuple[tuple[str, bytes | None], ...] = ()
    """The record's headers, in order (some travel on: consumer/stages/headers.py)."""

    @classmethod
    def from_message(cls, message: Message) -> InputRecord:
        """A consumed message (one without an error: those always name their topic, partition and offset)."""
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        if topic is None or partition is None or offset is None:
            raise ValueError(f"not a consumed record: {topic}[{partition}]@{offset}")
        _, timestamp = message.timestamp()
        raw = message.headers() or []
        pairs = raw.items() if isinstance(raw, dict) else raw
        headers = tuple(
            (name, value if isinstance(value, bytes) or value is None else value.encode("utf-8", "backslashreplace"))
            for name, value in pairs
        )
        return cls(
            topic, partition, offset, message.key(), message.value(), timestamp if timestamp > 0 else None, headers
        )

    @property
    def tp(self) -> TopicPartitionKey:
        return (self.topic, self.partition)

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass
class WorkItem:
    """One input record between the poll loop and its published result or dead letter."""

    record: InputRecord
    epoch: int
    event: DiagramEvent | None = None
    image: Future[LoadedImage] | None = None
    failure: ProcessingError | None = None
    """Refused before the model (unparseable): dead-lettered."""
    event_id: str | None = None
    polled_at: float = field(default_factory=time.monotonic)

    @property
    def tp(self) -> TopicPartitionKey:
        return self.record.tp

    def describe(self) -> str:
        return f"id={self.event_id} {self.record}"


@dataclass(frozen=True)
class Described:
    """An event the model described, with its share of the model call that did it."""

    item: WorkItem
    loaded: LoadedImage
    generation: Generation
    generation_time: float
    batch_size: int
    cache: CacheStatus = "off"
    """"hit" (answered from the result cache: no model call), "miss", or "off" (no cache topic)."""
    result_key: str | None = None
    """What identifies this result (consumer/result_cache/key.py); None where no keyer was given."""


@dataclass(frozen=True)
class Failed:
    """An event that cannot be described: it is dead-lettered with this error."""

    item: WorkItem
    error: ProcessingError


Outcome = Described | Failed


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to publish (a result or a dead letter) and the input record it completes."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]] | None
    source: InputRecord
    epoch: int
    outcome: str
    """"ok", "dead_lettered" or "retry_scheduled" (a hop to a retry topic): the label of
    diagram_events_total; or "cache", a result cache entry published beside its result, which settles
    nothing (`settles_input`)."""
    event_id: str | None = None
    log_fields: dict[str, Any] = field(default_factory=dict)
    """What the per-event log line reports besides the source (timings, tokens, batch size)."""
    fallback: Callable[[str], OutgoingRecord] | None = None
    """What settles the input instead when this record cannot be published as it is; called with why
    (PRODUCER_LIMIT or `topic_limit(...)` when it is too large, the producer's error otherwise)."""
    on_settled: Callable[[OutgoingRecord, float], None] | None = None
    """Called once the record settles its input (acknowledged, or its transaction committed), with the
    time.monotonic() it was produced at: where the event's trace ends (consumer/tracing.py)."""

    @property
    def settles_input(self) -> bool:
        """Whether this record's acknowledgement completes its input (a result cache entry does not)."""
        return self.outcome != CACHE_OUTCOME

    @property
    def source_tp(self) -> TopicPartitionKey:
        return self.source.tp

    @property
    def shape(self) -> tuple[str, int, int, str, bool]:
        """Which input and which kind of record: what a too-large refusal is remembered by."""
        return (self.source.topic, self.source.partition, self.source.offset, self.topic, self.value is None)

    def log_produced(self) -> None:
        """The event's log line, once its result is handed to the producer (dead letters log when built)."""
        if self.outcome != "ok":
            return
        topic, partition, offset = self.source.topic, self.source.partition, self.source.offset
        fields = self.log_fields
        logger.info(
            "described id=%s %s[%d]@%d in %.2f s (%d tokens, batch %d)",
            self.event_id,
            topic,
            partition,
            offset,
            fields["inference_time"],
            fields["output_tokens"],
            fields["batch_size"],
            extra=event_fields(self.event_id, topic, partition, offset, "ok", **fields),
        )
