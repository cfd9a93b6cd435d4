"""In-memory doubles of what the pipeline talks to, for unit tests that drive the stages without a broker.

- `FakeConsumer` and `FakeProducer` stand in for confluent_kafka's clients: the same calls, real
  `confluent_kafka.Message` and `TopicPartition` objects, records kept in memory, and test controls
  (append records, revoke or lose partitions, hold or fail acknowledgements, fail a transaction call).
  Both can be handed to `Pipeline` as its factories (`consumer_factory=consumer.factory`).
- `FakeResolver` stands in for `ImageResolver`, `DescribingGenerator` for the model: its text says
  which image it saw, so a result that reached the wrong event shows.
- `WindowStage`, `Collector` and `RecordingListener` stand in for a stage's neighbours.
- `PipelineThread` runs a whole `Pipeline` on these, with a deadline.

Nothing here sleeps for long: a client call waits at most MAX_BLOCK_S, so a test waits for a condition
(`wait_for`) instead of a duration. What each double emulates, and how faithfully, is in its docstring.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import sys
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Iterator, Literal, Mapping, Sequence, TypeVar, cast

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    OFFSET_STORED,
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from PIL import Image

from consumer.engine.base import Generation, GenerationBatch, GenerationRequest, ImageFeatures
from consumer.errors import DecodeError, ProcessingError
from consumer.events import DiagramEvent, ImageRef
from consumer.images import LoadedImage
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.pipeline import Pipeline
from consumer.stages.base import Described, InputRecord, MessageRejected, WorkItem

MAX_BLOCK_S = 0.005
"""The longest any fake client call waits (poll and flush return early when there is nothing to do)."""

HeaderValue = str | bytes | None
Headers = list[tuple[str, HeaderValue]] | dict[str, HeaderValue]
"""Record headers as confluent_kafka takes and returns them."""
StoredHeaders = list[tuple[str, bytes | None]]
"""Headers as a consumer reads them back: values as bytes."""
DeliveryCallback = Callable[[KafkaError | None, Message], None]
RebalanceCallback = Callable[[Any, list[TopicPartition]], None]

T = TypeVar("T")


def wait_for(condition: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    """Return once `condition()` is true; fail the test if it is not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come true within {timeout} s")
        time.sleep(0.002)


# -- record encoding ----------------------------------------------------------------------------------
RECORD_BATCH_OVERHEAD = 61
"""Bytes of a v2 record batch's own header (base offset .. record count), which a broker counts against a
topic's max.message.bytes together with the records."""


def _encoded(data: str | bytes | None) -> bytes | None:
    """Keys, values and header values as librdkafka sends them: str as UTF-8, bytes as they are."""
    return data.encode() if isinstance(data, str) else data


def _stored_headers(headers: Headers | None) -> StoredHeaders | None:
    """Headers as a consumer reads them back: names as str, values as bytes or None; none as None."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [(name, _encoded(value)) for name, value in pairs]


def _as_given(headers: StoredHeaders | None) -> Headers | None:
    """Stored headers in the type `Message` takes."""
    return None if headers is None else [(name, value) for name, value in headers]


def _varint_size(number: int) -> int:
    """Bytes of a zigzag varint, as the v2 record format writes lengths and deltas."""
    zigzag = (number << 1) ^ (number >> 63)
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


def _length_prefixed(data: bytes | None) -> int:
    return _varint_size(-1) if data is None else _varint_size(len(data)) + len(data)


def record_size(key: bytes | None, value: bytes | None, headers: StoredHeaders | None) -> int:
    """Bytes of one uncompressed v2 record (KIP-98 format), its length prefix included."""
    pairs = headers or []
    body = 1 + _varint_size(0) + _varint_size(0)  # attributes, timestamp delta, offset delta
    body += _length_prefixed(key) + _length_prefixed(value) + _varint_size(len(pairs))
    body += sum(_length_prefixed(name.encode()) + _length_prefixed(data) for name, data in pairs)
    return _varint_size(body) + body


def record_batch_size(key: bytes | None, value: bytes | None, headers: StoredHeaders | None) -> int:
    """Bytes of a record batch that holds this record alone, uncompressed: what a broker compares with
    the topic's max.message.bytes when the producer's batch.size keeps an oversized record alone."""
    return RECORD_BATCH_OVERHEAD + record_size(key, value, headers)


# -- consumer -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredRecord:
    """A record in a FakeConsumer's partition log."""

    key: bytes | None
    value: bytes | None
    headers: StoredHeaders | None
    timestamp_ms: int


class FakeConsumer:
    """A group member alone in its group, on in-memory partitions, answering what the pipeline calls on
    `confluent_kafka.Consumer`.

    Emulated as librdkafka 2.16 does it, with the cooperative-sticky assignor:
    - the first `poll` after `subscribe` assigns every partition of the subscribed topics through
      `on_assign`; the assignment changes only after a callback returns (the binding's incremental
      assign/unassign), so inside `on_assign` `assignment()` does not list the new partitions yet and
      inside `on_revoke` it still lists the leaving ones;
    - a newly assigned partition starts at its committed offset, else at the start (auto.offset.reset
      earliest, the service's setting) or the end (latest);
    - `pause` is kept per partition across unassign and assign (measured in 2.16, see intake's
      `_on_assign`), and a paused partition returns nothing;
    - async commits are answered through the config's `on_commit` from the next `poll` (or `close`),
      synchronous ones return the committed `TopicPartition`s or raise; a commit of no offsets raises
      _NO_OFFSET;
    - `consumer_group_metadata()` is librdkafka's "CGMDv2:" bytes: the generation (counted up on every
      assignment change) and the member id, or generation -1 and no member id once partitions were lost
      (the member was fenced) until the next assignment;
    - `close()` revokes the assignment through `on_revoke`, then every call raises RuntimeError.

    Not emulated: other members, fetch sizes and prefetching (a record is returned as soon as it is
    appended), isolation levels. `poll` returns records round-robin across partitions and waits at most
    MAX_BLOCK_S, waking when a record is appended.

    Test controls: `append`, `push_error` (a message with an error), `report_error` (error_cb),
    `grant` / `revoke` / `lose` (take effect at the next poll), `commit_error` (refuse commits),
    and the observations `committed_offsets`, `commits`, `unowned_commits`, `paused`, `polls`, `closed`.
    """

    def __init__(self, config: Mapping[str, Any] | None = None, *, partitions: Mapping[str, int] | None = None) -> None:
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._logs: dict[str, list[list[StoredRecord]]] = {
            topic: [[] for _ in range(count)] for topic, count in (partitions or {}).items()
        }
        self._subscription: list[str] = []
        self._on_assign: RebalanceCallback | None = None
        self._on_revoke: RebalanceCallback | None = None
        self._on_lost: RebalanceCallback | None = None
        self._assignment: list[TopicPartitionKey] = []
        self._positions: dict[TopicPartitionKey, int] = {}
        self._cursor = 0
        self._rebalances: deque[tuple[Literal["all", "grant", "revoke", "lose"], list[TopicPartitionKey]]] = deque()
        self._commit_answers: deque[tuple[KafkaError | None, list[TopicPartition]]] = deque()
        self._error_messages: deque[Message] = deque()
        self._client_errors: deque[KafkaError] = deque()
        self._generation = 0
        self._member_id = ""
        self._members = itertools.count(1)
        self._configured = False
        self.config: dict[str, Any] = {}
        self.group_id = "fake-group"
        self.on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = None
        """The config's on_commit; may be set directly when the consumer is built before its delivery."""
        self.error_cb: Callable[[KafkaError], None] | None = None
        self.committed_offsets: dict[TopicPartitionKey, int] = {}
        """The group's committed offsets (Kafka's next offset to read), shared with a FakeProducer's
        `group_offsets` where transactions commit them."""
        self.commits: list[dict[TopicPartitionKey, int]] = []
        """Every accepted `commit`, in order."""
        self.unowned_commits: list[tuple[TopicPartitionKey, int]] = []
        """Offsets committed for partitions not assigned to this member at the time (a zombie's commit)."""
        self.commit_error: KafkaError | None = None
        """While set, every commit is refused with this error (nothing is stored)."""
        self.paused: set[TopicPartitionKey] = set()
        self.polls = 0
        self.closed = False
        if config is not None:
            self._configure(config)

    def _configure(self, config: Mapping[str, Any]) -> None:
        self._configured = True
        self.config = dict(config)
        self.group_id = str(config.get("group.id", self.group_id))
        self.on_commit = config.get("on_commit", self.on_commit)
        self.error_cb = config.get("error_cb", self.error_cb)

    def factory(self, config: dict[str, Any]) -> Consumer:
        """A `ConsumerFactory` that configures this consumer (on_commit, error_cb, group.id) and returns it."""
        with self._lock:
            if self._configured:
                raise AssertionError("this FakeConsumer was already configured: one per pipeline")
            self._configure(config)
        return cast(Consumer, self)

    # -- test controls ------------------------------------------------------------------------------------
    def append(
        self,
        topic: str,
        partition: int,
        value: str | bytes | None,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
    ) -> int:
        """Add a record at the end of `topic[partition]` (created if missing); returns its offset."""
        record = StoredRecord(
            _encoded(key), _encoded(value), _stored_headers(headers), timestamp_ms or int(time.time() * 1000)
        )
        with self._arrived:
            log = self._logs.setdefault(topic, [])
            while len(log) <= partition:
                log.append([])
            log[partition].append(record)
            self._arrived.notify_all()
            return len(log[partition]) - 1

    def record_at(self, tp: TopicPartitionKey, offset: int) -> StoredRecord:
        with self._lock:
            return self._logs[tp[0]][tp[1]][offset]

    def end_offset(self, tp: TopicPartitionKey) -> int:
        with self._lock:
            log = self._logs.get(tp[0], [])
            return len(log[tp[1]]) if tp[1] < len(log) else 0

    def push_error(self, error: KafkaError, topic: str | None = None, partition: int | None = None) -> None:
        """The next poll returns a message that carries `error` (as librdkafka returns consumer errors)."""
        with self._arrived:
            where: dict[str, Any] = {"topic": topic} if topic is not None else {}
            if partition is not None:
                where["partition"] = partition
            self._error_messages.append(Message(error=error, **where))
            self._arrived.notify_all()

    def report_error(self, error: KafkaError) -> None:
        """The next poll calls the config's error_cb with `error`."""
        with self._arrived:
            self._client_errors.append(error)
            self._arrived.notify_all()

    def grant(self, tps: Iterable[TopicPartitionKey]) -> None:
        """The group assigns `tps` to this member at the next poll (through on_assign)."""
        self._queue_rebalance("grant", tps)

    def revoke(self, tps: Iterable[TopicPartitionKey]) -> None:
        """The group takes `tps` away at the next poll (through on_revoke)."""
        self._queue_rebalance("revoke", tps)

    def lose(self, tps: Iterable[TopicPartitionKey]) -> None:
        """This member is fenced and loses `tps` at the next poll (through on_lost, else on_revoke)."""
        self._queue_rebalance("lose", tps)

    def _queue_rebalance(
        self, kind: Literal["all", "grant", "revoke", "lose"], tps: Iterable[TopicPartitionKey]
    ) -> None:
        with self._arrived:
            self._rebalances.append((kind, list(tps)))
            self._arrived.notify_all()

    # -- confluent_kafka.Consumer -------------------------------------------------------------------------
    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        self._check_open()
        with self._lock:
            self._subscription = list(topics)
            self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
        self._queue_rebalance("all", [])

    def poll(self, timeout: float | None = None) -> Message | None:
        self._check_open()
        with self._lock:
            self.polls += 1
        self._serve_callbacks()
        message = self._next_message()
        if message is None and (timeout is None or timeout > 0):
            with self._arrived:
                self._arrived.wait(MAX_BLOCK_S if timeout is None else min(timeout, MAX_BLOCK_S))
            self._serve_callbacks()
            message = self._next_message()
        return message

    def assignment(self) -> list[TopicPartition]:
        self._check_open()
        with self._lock:
            return [TopicPartition(topic, partition) for topic, partition in self._assignment]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._check_open()
        with self._lock:
            self.paused |= {(p.topic, p.partition) for p in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._check_open()
        with self._arrived:
            self.paused -= {(p.topic, p.partition) for p in partitions}
            self._arrived.notify_all()

    def commit(
        self,
        message: Message | None = None,
        offsets: list[TopicPartition] | None = None,
        asynchronous: bool = True,
    ) -> list[TopicPartition] | None:
        self._check_open()
        with self._arrived:
            if offsets is not None:
                points = {(p.topic, p.partition): p.offset for p in offsets}
            elif message is not None:
                points = {(str(message.topic()), int(message.partition() or 0)): int(message.offset() or 0) + 1}
            else:
                points = {tp: self._positions[tp] for tp in self._assignment}
            if not points:
                raise KafkaException(KafkaError(KafkaError._NO_OFFSET))
            error = self.commit_error
            if error is None:
                for tp, offset in points.items():
                    if tp not in self._assignment:
                        self.unowned_commits.append((tp, offset))
                    self.committed_offsets[tp] = offset
                self.commits.append(points)
            answer = [TopicPartition(topic, partition, offset) for (topic, partition), offset in points.items()]
            if asynchronous:
                self._commit_answers.append((error, answer))
                self._arrived.notify_all()
                return None
        if error is not None:
            raise KafkaException(error)
        return answer

    def committed(self, partitions: list[TopicPartition], timeout: float | None = None) -> list[TopicPartition]:
        self._check_open()
        with self._lock:
            return [
                TopicPartition(p.topic, p.partition, self.committed_offsets.get((p.topic, p.partition), OFFSET_INVALID))
                for p in partitions
            ]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        self._check_open()
        with self._lock:
            return [
                TopicPartition(p.topic, p.partition, self._positions.get((p.topic, p.partition), OFFSET_INVALID))
                for p in partitions
            ]

    def seek(self, partition: TopicPartition) -> None:
        """Move an assigned partition's position. A partition this member does not fetch is refused
        (_UNKNOWN_PARTITION; librdkafka's exact answer there depends on the partition's state)."""
        self._check_open()
        tp = (partition.topic, partition.partition)
        with self._arrived:
            if tp not in self._assignment:
                raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, f"{tp} is not assigned"))
            offset = partition.offset
            if offset == OFFSET_BEGINNING:
                offset = 0
            elif offset == OFFSET_END:
                offset = self.end_offset(tp)
            elif offset == OFFSET_STORED:
                offset = self.committed_offsets.get(tp, 0)
            self._positions[tp] = offset
            self._arrived.notify_all()

    def consumer_group_metadata(self) -> bytes:
        """librdkafka's layout: b"CGMDv2:", int32 generation (native order), group id and member id each
        NUL-terminated, then 1 (no group.instance.id)."""
        self._check_open()
        with self._lock:
            generation = self._generation if self._member_id else -1
            return (
                b"CGMDv2:"
                + generation.to_bytes(4, sys.byteorder, signed=True)
                + self.group_id.encode()
                + b"\0"
                + self._member_id.encode()
                + b"\0\x01"
            )

    def close(self) -> None:
        """Serve outstanding commit answers, revoke the assignment through on_revoke, and close."""
        if self.closed:
            return
        self._serve_commit_answers()
        with self._lock:
            leaving = list(self._assignment)
            on_revoke = self._on_revoke
        if leaving and on_revoke is not None:
            on_revoke(self, [TopicPartition(topic, partition) for topic, partition in leaving])
        with self._arrived:
            self._assignment = []
            self.closed = True
            self._arrived.notify_all()

    # -- internals ----------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("Consumer closed")

    def _next_message(self) -> Message | None:
        with self._lock:
            if self._error_messages:
                return self._error_messages.popleft()
            count = len(self._assignment)
            for step in range(count):
                tp = self._assignment[(self._cursor + step) % count]
                position = self._positions.get(tp, 0)
                log = self._logs.get(tp[0], [])
                if tp in self.paused or tp[1] >= len(log) or position >= len(log[tp[1]]):
                    continue
                record = log[tp[1]][position]
                self._positions[tp] = position + 1
                self._cursor = (self._cursor + step + 1) % count
                return Message(
                    topic=tp[0],
                    partition=tp[1],
                    offset=position,
                    key=record.key,
                    value=record.value,
                    headers=_as_given(record.headers),
                    timestamp=(TIMESTAMP_CREATE_TIME, record.timestamp_ms),
                )
            return None

    def _serve_callbacks(self) -> None:
        """What librdkafka serves from poll: error_cb, commit answers, rebalances; each called without
        the lock, since the callbacks call back into the consumer."""
        while True:
            with self._lock:
                error = self._client_errors.popleft() if self._client_errors else None
            if error is None:
                break
            if self.error_cb is not None:
                self.error_cb(error)
        self._serve_commit_answers()
        while True:
            with self._lock:
                if not self._rebalances:
                    return
                kind, tps = self._rebalances.popleft()
            self._rebalance(kind, tps)

    def _serve_commit_answers(self) -> None:
        while True:
            with self._lock:
                if not self._commit_answers:
                    return
                error, partitions = self._commit_answers.popleft()
            if self.on_commit is not None:
                self.on_commit(error, partitions)

    def _rebalance(self, kind: Literal["all", "grant", "revoke", "lose"], tps: list[TopicPartitionKey]) -> None:
        with self._lock:
            if kind == "all":
                tps = [(topic, p) for topic in self._subscription for p in range(len(self._logs.get(topic, [[]])))]
                kind = "grant"
            if kind == "grant":
                changed = [tp for tp in dict.fromkeys(tps) if tp not in self._assignment]
            else:
                changed = [tp for tp in dict.fromkeys(tps) if tp in self._assignment]
            if not changed:
                return
            self._generation += 1
            if kind == "lose":
                self._member_id = ""  # fenced: librdkafka reports no member until it rejoins
            elif not self._member_id:
                self._member_id = f"rdkafka-fake-{next(self._members)}"
            if kind == "grant":
                callback = self._on_assign
            elif kind == "lose" and self._on_lost is not None:
                callback = self._on_lost
            else:
                callback = self._on_revoke  # librdkafka revokes lost partitions where no on_lost is set
        if callback is not None:
            callback(self, [TopicPartition(topic, partition) for topic, partition in changed])
        with self._arrived:
            if kind == "grant":
                reset = str(self.config.get("auto.offset.reset", "earliest"))
                for tp in changed:
                    self._assignment.append(tp)
                    default = self.end_offset(tp) if reset in ("latest", "end", "largest") else 0
                    self._positions[tp] = self.committed_offsets.get(tp, default)
            else:
                for tp in changed:
                    self._assignment.remove(tp)
                    self._positions.pop(tp, None)
            self._arrived.notify_all()


# -- producer -----------------------------------------------------------------------------------------
@dataclass
class Transaction:
    """One transaction of a transactional FakeProducer, and how it ended."""

    records: list[Message] = field(default_factory=list)
    offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    """Sent with send_offsets_to_transaction; committed to the group with the records."""
    group_metadata: bytes | None = None
    state: Literal["open", "abortable", "committed", "aborted"] = "open"
    error: KafkaError | None = None
    """The first delivery failure: the transaction can then only be aborted."""


@dataclass
class _Pending:
    """A produced record waiting for its delivery report."""

    message: Message
    on_delivery: DeliveryCallback | None
    transaction: Transaction | None


class FakeProducer:
    """`confluent_kafka.Producer` as the pipeline uses it: produce with delivery callbacks served from
    poll/flush, and the transactional API; records are kept in memory.

    Record sizing and encoding, where a mistake would hide a bug:
    - produce() hands every record to a real librdkafka producer (no reachable broker, purged at once),
      so the argument checks and the size check are librdkafka's own: TypeError for a header value that
      is not str, bytes or None, KafkaException(MSG_SIZE_TOO_LARGE) when key + value + headers (with 36
      bytes of worst-case record overhead, and each header's two length varints) exceed the config's
      message.max.bytes (default 1000000).
    - A per-topic `topic_limits` (the topics' max.message.bytes) fails delivery with MSG_SIZE_TOO_LARGE
      in the callback, as a broker does, when the record batch that carries the record alone
      (`record_batch_size`: 61 bytes of batch header plus the v2 record) is over the limit. Compression
      is not applied: the broker compares compressed batches, so a record refused here might pass a
      real broker with compression.type set; one accepted here fits uncompressed anyway. Records are
      never batched together here (the service's batch.size keeps an oversized record alone).
    - What is stored is what a consumer reads back: str keys, values and header values as UTF-8 bytes,
      header names as str, no headers as None. The partition is the one given, else crc32(key) modulo
      the topic's partition count (librdkafka's consistent_random for keyed records), else round robin;
      offsets count up per partition, aborted records included (as in a real log).

    Delivery: callbacks run from poll(), flush(), and (for a transaction's records) commit_transaction
    and abort_transaction, never from produce(); a callback may produce again. poll and flush wait at
    most MAX_BLOCK_S and flush returns the number of records still unacknowledged (held) at once.

    Transactions: init/begin/send_offsets/commit/abort in librdkafka's order, _STATE otherwise (also
    for produce outside a transaction), _NOT_CONFIGURED without transactional.id. A delivery failure
    makes commit_transaction raise an abortable error (txn_requires_abort); abort_transaction purges
    what was not yet acknowledged (_PURGE_QUEUE in its callback). A committed transaction's records go
    to `records` and its offsets into `group_offsets`; an aborted one's records stay in `aborted`.

    Test controls: `hold` (records not yet acknowledged), `delivery_error` (fail a record's delivery),
    `fail_next(method, error)` (the next call of a method raises; a fatal KafkaError makes every later
    transactional call raise it too, as librdkafka does after fencing), `mirror` (see `loop_back`).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        topic_limits: Mapping[str, int] | None = None,
        partitions: Mapping[str, int] | None = None,
        group_offsets: dict[TopicPartitionKey, int] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._produced = threading.Condition(self._lock)
        self._serving = threading.RLock()
        """Held while callbacks run, so a commit decides only after every delivery report was served."""
        self.topic_limits = dict(topic_limits or {})
        self.partitions = dict(partitions or {})
        self.group_offsets: dict[TopicPartitionKey, int] = group_offsets if group_offsets is not None else {}
        self.records: list[Message] = []
        """Acknowledged records a read_committed reader sees, in acknowledgement order."""
        self.failed: list[tuple[Message, KafkaError]] = []
        """Records whose delivery failed, with the error their callback got."""
        self.transactions: list[Transaction] = []
        self.hold: Callable[[Message], bool] | None = None
        """Records for which this returns True stay unacknowledged (in flight) until it no longer does."""
        self.delivery_error: Callable[[Message], KafkaError | None] | None = None
        self.mirror: Callable[[Message], None] | None = None
        """Called with each record once a read_committed reader would see it (acknowledged; in a
        transaction, committed), before its delivery callback and outside the producer's lock."""
        """The error a record's delivery fails with (None: delivered), after the topic limit check."""
        self._pending: list[_Pending] = []
        self._next_offsets: dict[TopicPartitionKey, int] = {}
        self._round_robin = itertools.count()
        self._injected: dict[str, deque[KafkaError | Exception]] = {}
        self._transaction: Transaction | None = None
        self._initialised = False
        self._fatal: KafkaError | None = None
        self._configured = False
        self.config: dict[str, Any] = {}
        self.message_max_bytes = 1_000_000
        self._librdkafka: Producer | None = None
        if config is not None:
            self._configure(config)

    def _configure(self, config: Mapping[str, Any]) -> None:
        self._configured = True
        self.config = dict(config)
        self.message_max_bytes = int(self.config.get("message.max.bytes", 1_000_000))
        # Validates and sizes records only: nothing is ever sent (each record is purged right away).
        self._librdkafka = Producer(
            {
                "bootstrap.servers": "127.0.0.1:9",
                "message.max.bytes": self.message_max_bytes,
                "log_level": 0,
                "error_cb": lambda _error: None,
                "reconnect.backoff.ms": 1000,
                "reconnect.backoff.max.ms": 10000,
            }
        )

    def factory(self, config: dict[str, Any]) -> Producer:
        """A `ProducerFactory` that configures this producer (message.max.bytes, transactional.id) and returns it."""
        with self._lock:
            if self._configured:
                raise AssertionError("this FakeProducer was already configured: one per pipeline")
            self._configure(config)
        return cast(Producer, self)

    @property
    def transactional(self) -> bool:
        return "transactional.id" in self.config

    # -- test controls and observations -------------------------------------------------------------------
    def fail_next(self, method: str, error: KafkaError | Exception) -> None:
        """The next call of `method` ("produce", "commit_transaction", ...) raises `error` (a KafkaError
        as KafkaException) instead of doing its work."""
        with self._lock:
            self._injected.setdefault(method, deque()).append(error)

    def records_in(self, topic: str) -> list[Message]:
        with self._lock:
            return [message for message in self.records if message.topic() == topic]

    @property
    def aborted(self) -> list[Message]:
        with self._lock:
            return [message for txn in self.transactions if txn.state == "aborted" for message in txn.records]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- confluent_kafka.Producer -------------------------------------------------------------------------
    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        timestamp: int = 0,
        headers: Headers | None = None,
        callback: DeliveryCallback | None = None,
    ) -> None:
        self._raise_injected("produce")
        if self._librdkafka is None:
            raise AssertionError("FakeProducer used before it was configured")
        self._librdkafka.produce(topic, value=value, key=key, headers=headers)  # librdkafka's own checks
        self._librdkafka.purge(in_queue=True, in_flight=True, blocking=False)
        self._librdkafka.poll(0)
        with self._produced:
            if self._fatal is not None:
                raise KafkaException(self._fatal)
            transaction = self._transaction
            if self.transactional and (transaction is None or transaction.state != "open"):
                raise KafkaException(KafkaError(KafkaError._STATE, "Unable to produce message: not in a transaction"))
            stored_key = _encoded(key)
            chosen = self._partition_for(topic, stored_key, partition)
            offset = self._next_offsets.get((topic, chosen), 0)
            self._next_offsets[(topic, chosen)] = offset + 1
            message = Message(
                topic=topic,
                partition=chosen,
                offset=offset,
                key=stored_key,
                value=_encoded(value),
                headers=_as_given(_stored_headers(headers)),
                timestamp=(TIMESTAMP_CREATE_TIME, timestamp or int(time.time() * 1000)),
            )
            self._pending.append(_Pending(message, on_delivery or callback, transaction))
            if transaction is not None:
                transaction.records.append(message)
            self._produced.notify_all()

    def poll(self, timeout: float | None = None) -> int:
        served = self._serve()
        if not served and (timeout is None or timeout > 0):
            with self._produced:
                self._produced.wait(MAX_BLOCK_S if timeout is None else min(timeout, MAX_BLOCK_S))
            served = self._serve()
        return served

    def flush(self, timeout: float | None = None) -> int:
        self._serve()
        return len(self)

    def init_transactions(self, timeout: float | None = None) -> None:
        self._transactional_call("init_transactions")
        with self._lock:
            self._initialised = True

    def begin_transaction(self) -> None:
        self._transactional_call("begin_transaction")
        with self._lock:
            if not self._initialised or self._transaction is not None:
                raise KafkaException(KafkaError(KafkaError._STATE, "Operation not valid in this state"))
            self._transaction = Transaction()
            self.transactions.append(self._transaction)

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: bytes, timeout: float | None = None
    ) -> None:
        if not isinstance(group_metadata, bytes):
            raise TypeError(f"expected bytes, {type(group_metadata).__name__} found")
        transaction = self._open_transaction("send_offsets_to_transaction")
        with self._lock:
            transaction.offsets.update({(p.topic, p.partition): p.offset for p in positions if p.offset >= 0})
            transaction.group_metadata = group_metadata

    def commit_transaction(self, timeout: float | None = None) -> None:
        transaction = self._open_transaction("commit_transaction")
        with self._serving:
            self._serve(transaction)
            with self._produced:
                if any(pending.transaction is transaction for pending in self._pending):
                    self._produced.wait(MAX_BLOCK_S)  # then librdkafka's answer when the timeout ran out
                    raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "records unacknowledged", retriable=True))
                if transaction.error is not None:
                    transaction.state = "abortable"
                    raise KafkaException(
                        KafkaError(transaction.error.code(), transaction.error.str(), txn_requires_abort=True)
                    )
                transaction.state = "committed"
                self._transaction = None
                self.records.extend(transaction.records)
                self.group_offsets.update(transaction.offsets)
            if self.mirror is not None:
                for message in transaction.records:
                    self.mirror(message)

    def abort_transaction(self, timeout: float | None = None) -> None:
        self._transactional_call("abort_transaction")
        with self._serving:
            with self._lock:
                transaction = self._transaction
                if transaction is None:
                    raise KafkaException(KafkaError(KafkaError._STATE, "no transaction to abort"))
                purged = [pending for pending in self._pending if pending.transaction is transaction]
                self._pending = [pending for pending in self._pending if pending.transaction is not transaction]
                transaction.state = "aborted"
                self._transaction = None
            for pending in purged:
                if pending.on_delivery is not None:
                    error = KafkaError(KafkaError._PURGE_QUEUE)
                    pending.on_delivery(error, _with_error(pending.message, error))

    # -- internals ----------------------------------------------------------------------------------------
    def _partition_for(self, topic: str, key: bytes | None, partition: int) -> int:
        count = self.partitions.get(topic, 1)
        if partition >= 0:
            if partition >= count:
                raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION))
            return partition
        if key is not None:
            return zlib.crc32(key) % count
        return next(self._round_robin) % count

    def _raise_injected(self, method: str) -> None:
        with self._lock:
            queue = self._injected.get(method)
            if not queue:
                return
            error = queue.popleft()
            if not isinstance(error, KafkaError):
                raise error
            if error.fatal():
                self._fatal = error
            elif error.txn_requires_abort() and self._transaction is not None:
                self._transaction.state = "abortable"
        raise KafkaException(error)

    def _transactional_call(self, method: str) -> None:
        if not self.transactional:
            raise KafkaException(
                KafkaError(KafkaError._NOT_CONFIGURED, "The Transactional API requires transactional.id")
            )
        with self._lock:
            if self._fatal is not None:
                raise KafkaException(self._fatal)
        self._raise_injected(method)

    def _open_transaction(self, method: str) -> Transaction:
        self._transactional_call(method)
        with self._lock:
            transaction = self._transaction
            if transaction is None:
                raise KafkaException(KafkaError(KafkaError._STATE, "Operation not valid in state Ready"))
            if transaction.state != "open":
                raise KafkaException(
                    KafkaError(KafkaError._STATE, "the transaction must be aborted", txn_requires_abort=True)
                )
            return transaction

    def _serve(self, transaction: Transaction | None = None) -> int:
        """Acknowledge (or fail) every pending record not held, calling the delivery callbacks; records
        produced by a callback are served too. Returns how many were served."""
        served = 0
        with self._serving:
            while True:
                with self._lock:
                    ready = [
                        pending
                        for pending in self._pending
                        if (transaction is None or pending.transaction is transaction)
                        and not (self.hold is not None and self.hold(pending.message))
                    ]
                    if not ready:
                        return served
                    taken = {id(pending) for pending in ready}
                    self._pending = [pending for pending in self._pending if id(pending) not in taken]
                    outcomes = [(pending, self._delivery_outcome(pending)) for pending in ready]
                for pending, error in outcomes:
                    served += 1
                    if error is None and pending.transaction is None and self.mirror is not None:
                        self.mirror(pending.message)
                    message = pending.message if error is None else _with_error(pending.message, error)
                    if pending.on_delivery is not None:
                        pending.on_delivery(error, message)

    def _delivery_outcome(self, pending: _Pending) -> KafkaError | None:
        """Decide, and record, one record's delivery (called with the lock held)."""
        message = pending.message
        limit = self.topic_limits.get(str(message.topic()))
        error: KafkaError | None = None
        size = record_batch_size(message.key(), message.value(), _stored_headers(message.headers()))
        if limit is not None and size > limit:
            error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
        elif self.delivery_error is not None:
            error = self.delivery_error(message)
        if error is not None:
            self.failed.append((message, error))
            if pending.transaction is not None and pending.transaction.error is None:
                pending.transaction.error = error
        elif pending.transaction is None:
            self.records.append(message)
        return error


def _with_error(message: Message, error: KafkaError) -> Message:
    return Message(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        value=message.value(),
        headers=message.headers(),
        error=error,
    )


def loop_back(producer: FakeProducer, consumer: FakeConsumer, topics: Iterable[str]) -> None:
    """Records `producer` publishes to `topics` (the retry topics) appear in `consumer`'s partitions of
    the same number, as a broker serves what one client writes to another that reads the topic. Give
    both the same partition counts for those topics."""
    looped = set(topics)

    def append(message: Message) -> None:
        topic = str(message.topic())
        if topic in looped:
            headers = [(name, value) for name, value in message.headers() or []]
            _, timestamp = message.timestamp()
            consumer.append(topic, int(message.partition() or 0), message.value(), message.key(), headers, timestamp)

    producer.mirror = append


@dataclass
class Settlement:
    """What the published records say about each event, by its original input (topic, partition, offset):
    how many results and dead letters it has, and the highest attempt a retry hop of it was for."""

    finals: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    hops: dict[tuple[str, int, int], int] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Iterable[Message], output_topic: str, dlq_topic: str) -> Settlement:
        settlement = cls()
        for message in records:
            headers = {name: (value or b"").decode("utf-8", "replace") for name, value in message.headers() or []}
            if message.topic() == output_topic:
                source = json.loads(message.value() or b"{}")["metadata"]["source"]
                settlement.finals[(source["topic"], source["partition"], source["offset"])] += 1
            elif message.topic() == dlq_topic:
                origin = (headers["source.topic"], int(headers["source.partition"]), int(headers["source.offset"]))
                settlement.finals[origin] += 1
            elif "retry.origin" in headers:
                topic, partition, offset = headers["retry.origin"].split("/")
                key = (topic, int(partition), int(offset))
                settlement.hops[key] = max(settlement.hops.get(key, 0), int(headers["retry.attempt"]))
        return settlement

    def settles(self, consumer: FakeConsumer, tp: TopicPartitionKey, offset: int, input_topic: str) -> bool:
        """Whether the record at `tp`@`offset` (of the input or a retry topic) has gone on: its event has
        a result or dead letter, or a hop to a later attempt than this record's was published."""
        if tp[0] == input_topic:
            origin, attempt = (tp[0], tp[1], offset), 1
        else:
            headers = {
                name: (value or b"").decode("utf-8", "replace")
                for name, value in consumer.record_at(tp, offset).headers or []
            }
            topic, partition, at = headers["retry.origin"].split("/")
            origin, attempt = (topic, int(partition), int(at)), int(headers["retry.attempt"])
        return self.finals[origin] > 0 or self.hops.get(origin, 0) > attempt


# -- images and the model -----------------------------------------------------------------------------
def color_of(number: int) -> tuple[int, int, int]:
    """A colour that names `number` (up to 65535): the images of different events differ."""
    return (number % 256, (number // 256) % 256, 200)


def image_of(number: int, size: tuple[int, int] = (4, 3)) -> Image.Image:
    return Image.new("RGB", size, color_of(number))


def png_base64(number: int, size: tuple[int, int] = (4, 3)) -> str:
    buffer = io.BytesIO()
    image_of(number, size).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def describe(image: Image.Image) -> str:
    """What `DescribingGenerator` says about an image: its size and its top-left pixel's colour."""
    red, green, blue = cast(tuple[int, int, int], image.convert("RGB").getpixel((0, 0)))
    return f"{image.width}x{image.height} #{red:02x}{green:02x}{blue:02x}"


class PoisonImage(RuntimeError):
    """What `DescribingGenerator` raises for a batch that holds a poison image."""


class DescribingGenerator:
    """A `Generator` whose text says which image it was given (`describe`), so a result that reached the
    wrong event shows. With `prepares`, `prepare_image` returns features (numpy arrays standing in for
    the tensors: nothing but this class reads them) and `generate` describes the image from those.

    Scripting: a batch that holds an image whose description `poison` accepts raises `PoisonImage`
    (the whole batch, as a model would); while `gate` is given and clear, every call waits for it (up to
    `gate_timeout`, then fails loudly). `calls` lists each call's descriptions, failed calls included.
    """

    def __init__(
        self,
        *,
        prepares: bool = False,
        poison: Callable[[str], bool] | None = None,
        gate: threading.Event | None = None,
        gate_timeout: float = 10.0,
    ) -> None:
        self.prepares, self.poison, self.gate, self.gate_timeout = prepares, poison, gate, gate_timeout
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def prepare_image(self, image: Image.Image) -> ImageFeatures | None:
        if not self.prepares:
            return None
        corner = np.asarray(image.convert("RGB").crop((0, 0, 1, 1)))
        grid = np.array([[1, image.height, image.width]])
        return ImageFeatures(pixel_values=cast(Any, corner), image_grid_thw=cast(Any, grid))

    def generate(self, requests: Sequence[GenerationRequest]) -> GenerationBatch:
        descriptions = [self._describe(request) for request in requests]
        with self._lock:
            self.calls.append(descriptions)
        if self.gate is not None and not self.gate.wait(self.gate_timeout):
            raise AssertionError("DescribingGenerator's gate was never opened")
        if self.poison is not None and any(self.poison(text) for text in descriptions):
            raise PoisonImage(f"poison image in a batch of {len(requests)}")
        generations = [Generation(text=text, output_tokens=len(text.split())) for text in descriptions]
        return GenerationBatch(generations, seconds=0.001 * len(requests), preprocess_seconds=0.0)

    @staticmethod
    def _describe(request: GenerationRequest) -> str:
        if request.image is not None:
            return describe(request.image)
        assert request.prepared is not None, "a request holds an image or its prepared features"
        _, height, width = (int(n) for n in np.asarray(request.prepared.image_grid_thw)[0])
        red, green, blue = (int(n) for n in np.asarray(request.prepared.pixel_values)[0, 0])
        return f"{width}x{height} #{red:02x}{green:02x}{blue:02x}"


class FakeResolver:
    """Stands in for `ImageResolver`: a reference resolves to `images[reference]` if given, else to an
    image made from the reference (`image_of(crc32(reference))`). `fail(reference, *errors)` makes the
    next resolutions of that reference raise those errors in turn. `calls` lists every reference
    resolved (attempts included). Thread-safe, like the real one."""

    def __init__(self, images: Mapping[str, Image.Image] | None = None) -> None:
        self.images = dict(images or {})
        self.calls: list[str] = []
        self._failures: dict[str, deque[ProcessingError]] = {}
        self._lock = threading.Lock()

    def fail(self, reference: str, *errors: ProcessingError) -> None:
        with self._lock:
            self._failures.setdefault(reference, deque()).extend(errors)

    def resolve(self, ref: ImageRef) -> LoadedImage:
        data = self.fetch(ref)
        return LoadedImage(image=self.decode(data), source_bytes=len(data))

    def fetch(self, ref: ImageRef) -> bytes:
        """The reference itself as the image's bytes; a scripted FetchError is raised here, a scripted
        DecodeError by the `decode` of these bytes."""
        reference = ref.url or ref.path or ref.base64 or ""
        with self._lock:
            self.calls.append(reference)
            failures = self._failures.get(reference)
            if failures and not isinstance(failures[0], DecodeError):
                raise failures.popleft()
        return reference.encode()

    def close(self) -> None:
        return None

    def decode(self, data: bytes) -> Image.Image:
        reference = data.decode()
        with self._lock:
            failures = self._failures.get(reference)
            if failures and isinstance(failures[0], DecodeError):
                raise failures.popleft()
        image = self.images.get(reference) or image_of(zlib.crc32(data) % 65536)
        return image.copy()


# -- work as the stages hand it on ----------------------------------------------------------------------
def event_value(event_id: str, image: Mapping[str, str] | None = None, **fields: Any) -> bytes:
    """An input record's value: a diagram event with `image` (default: an inline PNG) and any other fields."""
    return json.dumps({"id": event_id, "image": image or {"base64": png_base64(1)}, **fields}).encode()


def tracked(
    tracker: OffsetTracker,
    tp: TopicPartitionKey,
    offset: int,
    value: bytes | None = None,
    image: Future[LoadedImage] | None = None,
) -> WorkItem:
    """A parsed event e-<offset> for a new input record at `offset` keyed b"k<offset>", in flight in
    `tracker` (as resolve leaves it), with `image` or else its image (number `offset`) resolved."""
    epoch = tracker.epoch_of(tp) or tracker.assign(tp)
    tracker.add(tp, offset)
    event_id = f"e-{offset}"
    url = f"https://images.example.com/{offset}.png"
    value = value if value is not None else event_value(event_id, {"url": url})
    event = DiagramEvent.model_validate({"id": event_id, "image": {"url": url}})
    if image is None:
        image = Future()
        image.set_result(LoadedImage(image=image_of(offset), source_bytes=100))
    record = InputRecord(tp[0], tp[1], offset, f"k{offset}".encode(), value)
    return WorkItem(record, epoch, event=event, image=image, event_id=event_id)


def described(
    tracker: OffsetTracker, tp: TopicPartitionKey, offset: int, text: str = "| 1 | step | role |", **kwargs: Any
) -> Described:
    """What infer hands on for a described event at `offset` (see `tracked`)."""
    item = tracked(tracker, tp, offset, **kwargs)
    assert item.image is not None
    generation = Generation(text=text, output_tokens=len(text.split()))
    return Described(item, item.image.result(), generation, generation_time=0.01, batch_size=1)


# -- a stage's neighbours -----------------------------------------------------------------------------
class Collector(Generic[T]):
    """A next stage that keeps what it is given, in order. `failure`, when set, is raised by submit."""

    def __init__(self) -> None:
        self.taken: list[T] = []
        self.polls = 0
        self.closed = False
        self.failure: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, work: T) -> None:
        if self.failure is not None:
            raise self.failure
        with self._lock:
            self.taken.append(work)

    def poll(self, timeout: float = 0.0) -> None:
        with self._lock:
            self.polls += 1

    def join(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class WindowStage:
    """The stage intake feeds, as resolve takes records: refuses (MessageRejected) while `max_in_flight`
    events are in the tracker, drops a record of a held partition, otherwise tracks it and keeps it.
    `finish` marks taken records done, which frees the window."""

    def __init__(self, tracker: OffsetTracker, max_in_flight: int) -> None:
        self.tracker, self.max_in_flight = tracker, max_in_flight
        self.taken: list[tuple[InputRecord, int]] = []
        self.polls = 0
        self._finished: set[int] = set()

    def submit(self, record: InputRecord) -> None:
        if self.tracker.in_flight() >= self.max_in_flight:
            raise MessageRejected
        epoch = self.tracker.add(record.tp, record.offset)
        if epoch is not None:
            self.taken.append((record, epoch))

    def finish(self, count: int) -> None:
        """Mark the first `count` taken records not yet finished done (one of a revoked or rewound
        partition is passed over: its acknowledgement no longer counts)."""
        finished = 0
        for index, (record, epoch) in enumerate(self.taken):
            if finished == count:
                return
            if index not in self._finished and self.tracker.done(record.tp, record.offset, epoch):
                self._finished.add(index)
                finished += 1

    def offsets(self, tp: TopicPartitionKey) -> list[int]:
        return [record.offset for record, _ in self.taken if record.tp == tp]

    def poll(self, timeout: float = 0.0) -> None:
        self.polls += 1

    def join(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        return None


class RecordingListener:
    """Intake's RebalanceListener (the delivery's part of a rebalance), recorded: `rebalances` counts
    assignment changes, `revocations` lists (partitions, broker_ok, lost), and `inside` (if given) is
    called within each revocation, before intake forgets the partitions."""

    def __init__(self, inside: Callable[[list[TopicPartitionKey]], None] | None = None) -> None:
        self.rebalances = 0
        self.revocations: list[tuple[list[TopicPartitionKey], bool, bool]] = []
        self.inside = inside

    def rebalanced(self) -> None:
        self.rebalances += 1

    @contextmanager
    def revoking(self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False) -> Iterator[None]:
        self.revocations.append((list(tps), broker_ok, lost))
        if self.inside is not None:
            self.inside(list(tps))
        yield


# -- the whole pipeline -------------------------------------------------------------------------------
class PipelineThread:
    """`Pipeline.run()` on a thread, as main() runs it on the main one; `exit_code` once it returned."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pipeline-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.pipeline.run()
        except BaseException as exc:  # noqa: BLE001 - run() promises an exit code; report what escaped
            self.error = exc

    def start(self) -> PipelineThread:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float) -> int:
        """The exit code, once run() returned within `timeout` seconds."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the pipeline did not stop within {timeout} s")
        if self.error is not None:
            raise AssertionError("Pipeline.run() raised instead of returning an exit code") from self.error
        assert self.exit_code is not None
        return self.exit_code

    def stop(self, timeout: float) -> int:
        """Ask for a clean stop (SIGTERM's path) and wait for the exit code. Never asks twice, and never
        once the pipeline is stopping by itself: a second request exits the process at once."""
        if self.running and not self.pipeline.state.stopping and not self.pipeline.latch.tripped():
            self.pipeline.request_stop()
        return self.wait(timeout)
