"""How a batch's results reach Kafka, and when the input offsets behind them count as done.

Two guarantees behind one interface; the pipeline publishes every batch as

    with delivery.batch() as send:
        for record in records:
            send(record)

- `AtLeastOnce` (the default): each record is produced with a delivery callback, and its input
  offset is marked done only when the broker has acknowledged it. The poll thread commits, per
  partition, the offset below which everything is done (`OffsetTracker`), asynchronously and often.
  A record the producer cannot deliver within `message.timeout.ms` is fatal: the service stops
  without committing its input, and another member redoes it.
- `ExactlyOnce` (PROCESSING_GUARANTEE=exactly_once): one Kafka transaction per batch holds the
  batch's results, its dead letters and the input offsets they complete
  (`send_offsets_to_transaction` with the consumer's group metadata, KIP-447). If the transaction
  has to be aborted (a rebalance moved the group on, a record was refused), the batch's partitions
  are rewound to their committed offsets and processed again; a reader with
  `isolation.level=read_committed` never sees the aborted attempt.

Records of a partition that was revoked while the batch was generating are not sent: the
partition's new owner processes those events from the last committed offset.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.logs import kafka_client_logger
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.settings import Settings

logger = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.5
"""At-least-once: how often the poll thread commits what has been acknowledged."""
REVOKE_FLUSH_S = 5.0
"""At-least-once: how long a revocation waits for acknowledgements of results already produced."""
REVOKE_WAIT_S = 30.0
"""Exactly-once: how long a revocation waits for the transaction in progress to end."""
TRANSACTION_CALL_TIMEOUT_S = 10.0
"""Exactly-once: per call to the transaction coordinator; a timed-out call is retried."""
GROUP_METADATA_REFRESH_S = 1.0
"""Exactly-once: how often the poll thread re-reads the group metadata sent with each transaction."""


@dataclass(frozen=True)
class OutgoingRecord:
    """One record to publish (a result or a dead letter) and the input record it completes."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str]] | None
    source: Message
    epoch: int
    outcome: str  # "ok" or "dead_lettered": the label of diagram_events_total
    event_id: str | None = None
    log_fields: dict[str, Any] = field(default_factory=dict)
    """What the per-event log line reports besides the source (timings, tokens, batch size)."""
    fallback: Callable[[str], OutgoingRecord] | None = None
    """What settles the input instead when this record is too large to publish; called with who
    refused it (the producer's message.max.bytes, or the topic's max.message.bytes)."""

    @property
    def source_tp(self) -> TopicPartitionKey:
        return (self.source.topic(), self.source.partition())

    @property
    def shape(self) -> tuple[str, int, int, str, bool]:
        """Which input and which kind of record: what a too-large refusal is remembered by."""
        return (*self.source_tp, self.source.offset(), self.topic, self.value is None)


Send = Callable[[OutgoingRecord], "OutgoingRecord | None"]
"""Publishes one record, or its fallback when it is too large; returns what was published, or None
when the record's partition was revoked meanwhile (the record is dropped)."""


class Delivery(Protocol):
    def start(self, stopping: threading.Event) -> None:
        """Prepare the producer (exactly-once: fence older instances); returns early if stopping is set."""

    def batch(self) -> AbstractContextManager[Send]:
        """A scope in which one batch's records are sent; leaving it publishes them."""

    def tick(self) -> None:
        """Poll-thread housekeeping: commit what is done (at-least-once), rewind aborted partitions."""

    def revoking(
        self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False
    ) -> AbstractContextManager[None]:
        """Around forgetting revoked (or lost) partitions: keep what was published for them, no more."""

    def rebalanced(self) -> None:
        """Called on the poll thread after every assignment change."""

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The consumer's offset-commit callback."""

    def close(self, deadline: float, broker_ok: bool) -> bool:
        """Publish what is still queued and commit it, until `deadline`; True if all of it was."""


def transactional_id(settings: Settings) -> str:
    """TRANSACTIONAL_ID if set; else `<group>-<group.instance.id>` under static membership; else
    `<group>-<hostname>-<pid>`: unique among live replicas, and the same again when a container
    restarts in its pod (hostname and pid 1 kept), so the new instance fences the old one and aborts
    its open transaction at once instead of after transaction.timeout.ms. Zombies of a rebalance are
    fenced by the group generation in `send_offsets_to_transaction` (KIP-447), whatever the id."""
    if settings.transactional_id:
        return settings.transactional_id
    instance = settings.kafka_extra.get("group.instance.id")
    if instance:
        return f"{settings.kafka_group_id}-{instance}"
    return f"{settings.kafka_group_id}-{socket.gethostname()}-{os.getpid()}"


def names_a_member(group_metadata: bytes) -> bool:
    """Whether consumer_group_metadata() names a live member and generation. After a member is
    fenced librdkafka reports generation -1 and no member id, and the broker accepts offsets sent
    with those unchecked (a plain commit): a zombie could commit partitions it no longer owns. The
    layout is librdkafka's "CGMDv2:" (int32 generation, then NUL-terminated group and member ids);
    an unknown layout is trusted."""
    raw = bytes(group_metadata)
    if not raw.startswith(b"CGMDv2:") or len(raw) < 11:
        return True
    generation = int.from_bytes(raw[7:11], sys.byteorder, signed=True)
    ids = raw[11:].split(b"\0")
    return generation >= 0 and len(ids) > 1 and bool(ids[1])


def producer_config(settings: Settings) -> dict:
    """The producer's librdkafka config for the chosen guarantee."""
    config = settings.producer_config()
    if settings.processing_guarantee == "exactly_once":
        config["transactional.id"] = transactional_id(settings)
    return config


# Room left under a topic's max.message.bytes for the record batch's own framing (61 bytes of
# header, up to about 20 bytes and the headers per record).
TOPIC_LIMIT_MARGIN = 1024
LIBRDKAFKA_BATCH_SIZE = 1_000_000
"""librdkafka's default batch.size."""


def fit_to_topic_limits(config: dict, topics: list[str], timeout: float = 10.0) -> dict:
    """`config` with the producer's batch.size lowered under what every one of `topics` accepts.

    The broker refuses a whole record batch when it exceeds the topic's max.message.bytes, so one
    oversized result would take the small results batched with it down too. librdkafka never adds a
    record to a batch past batch.size, so with batch.size under the limit a batch of several records
    always fits, and an oversized record travels alone: the broker refuses it and nothing else, and
    its fallback (a dead letter) settles its input. The topics' configs are read once, here; where
    they cannot be read (broker down, no DescribeConfigs permission, topic not created yet) `config`
    is returned as it is.
    """
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    # Connection and security settings only: an admin client with the idempotence or transactional.id
    # of the producer would register as a producer with the broker.
    not_for_admin = {"error_cb", "enable.idempotence", "transactional.id", "acks", "linger.ms", "compression.type"}
    admin = AdminClient({**{key: value for key, value in config.items() if key not in not_for_admin},
                         "logger": kafka_client_logger("librdkafka.admin")})
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic) for topic in topics],
                                     request_timeout=timeout)
    limits: dict[str, int] = {}
    for resource, future in futures.items():
        topic = resource.name
        try:
            limits[topic] = int(future.result(timeout)["max.message.bytes"].value)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the producer's batch.size as it is
            logger.warning("cannot read max.message.bytes of %s (%s): if it is under batch.size, one record the "
                           "broker refuses as too large takes the records batched with it down too", topic, exc)
    if not limits:
        return config
    batch_size = max(1, min(limits.values()) - TOPIC_LIMIT_MARGIN)
    if batch_size >= int(config.get("batch.size", LIBRDKAFKA_BATCH_SIZE)):
        return config
    logger.info("topics accept record batches up to %s bytes (max.message.bytes): producer batch.size=%d",
                ", ".join(f"{topic} {limit}" for topic, limit in limits.items()), batch_size)
    return {**config, "batch.size": batch_size}


def make_delivery(
    settings: Settings,
    producer: Producer,
    consumer: Consumer,
    tracker: OffsetTracker,
    metrics: Metrics,
    fail: Callable[[BaseException], None],
    failed: Callable[[], bool],
) -> Delivery:
    kind = ExactlyOnce if settings.processing_guarantee == "exactly_once" else AtLeastOnce
    return kind(producer, consumer, tracker, metrics, fail, failed)


class _Base:
    def __init__(
        self,
        producer: Producer,
        consumer: Consumer,
        tracker: OffsetTracker,
        metrics: Metrics,
        fail: Callable[[BaseException], None],
        failed: Callable[[], bool],
    ) -> None:
        self.producer, self.consumer, self.tracker, self.metrics = producer, consumer, tracker, metrics
        self._fail, self._failed = fail, failed

    def _produce(self, record: OutgoingRecord, on_delivery: Callable | None = None) -> None:
        extra = {"on_delivery": on_delivery} if on_delivery is not None else {}
        while True:
            try:
                self.producer.produce(record.topic, value=record.value, key=record.key, headers=record.headers, **extra)
                return
            except BufferError:
                self.producer.poll(0.5)  # the local queue is full: let acknowledgements drain it
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE and record.fallback is not None:
                    raise _TooLarge() from None
                raise

    def _count(self, record: OutgoingRecord, produced_at: float) -> None:
        self.metrics.events.labels(record.outcome).inc()
        self.metrics.stage_seconds.labels("publish").observe(time.monotonic() - produced_at)
        timestamp = record.source.timestamp()[1]
        if timestamp > 0:
            self.metrics.stage_seconds.labels("end_to_end").observe(max(time.time() - timestamp / 1000, 0))

    def _committed(self, points: dict[TopicPartitionKey, int]) -> None:
        self.tracker.mark_committed(points)
        for (topic, partition), offset in points.items():
            self.metrics.committed_offset.labels(topic, str(partition)).set(offset)


class AtLeastOnce(_Base):
    """Produce with delivery callbacks; the poll thread commits what the broker acknowledged."""

    _last_commit = 0.0

    def start(self, stopping: threading.Event) -> None:
        return None

    def rebalanced(self) -> None:
        return None

    @contextmanager
    def batch(self) -> Iterator[Send]:
        yield self._send

    def _send(self, record: OutgoingRecord) -> OutgoingRecord | None:
        if not self.tracker.is_current(record.source_tp, record.epoch):
            return None
        try:
            self._produce(record, self._on_delivery(record))
        except _TooLarge:
            return self._send(record.fallback(PRODUCER_LIMIT))
        return record

    def _on_delivery(self, record: OutgoingRecord) -> Callable[[KafkaError | None, Message], None]:
        tp, offset, epoch = record.source_tp, record.source.offset(), record.epoch
        produced_at = time.monotonic()  # the handler is made just before its produce() call

        def on_delivery(error: KafkaError | None, _published: Message) -> None:
            if error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE and record.fallback is not None:
                logger.warning("broker refused %s for %s[%d]@%d as too large", record.outcome, tp[0], tp[1], offset)
                self._send(record.fallback(topic_limit(record.topic)))  # settles the input instead
                return
            if error is not None:
                # The producer already retried for message.timeout.ms: this input must not be
                # committed, and this member stops so that another one takes the partition over.
                logger.error("could not publish %s for %s[%d]@%d: %s", record.outcome, tp[0], tp[1], offset, error)
                self._fail(KafkaException(error))
                return
            if self.tracker.done(tp, offset, epoch):
                self._count(record, produced_at)

        return on_delivery

    def tick(self) -> None:
        if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self.commit()

    def commit(self, tps: list[TopicPartitionKey] | None = None, wait: bool = False) -> bool:
        """Commit what is done. Asynchronous unless `wait`: a synchronous commit blocks the poll
        loop for up to session.timeout.ms while the coordinator is unreachable."""
        self._last_commit = time.monotonic()
        if self._failed():
            return False  # after an unhandled error nothing more is committed
        points = self.tracker.commit_points(tps)
        if not points:
            return True
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in points.items()]
        try:
            if wait:
                answered = self.consumer.commit(offsets=offsets, asynchronous=False) or []
                refused = [(p.topic, p.partition) for p in answered if p.error is not None]
                if refused:
                    self.tracker.commit_failed(refused)
                    logger.warning("commit refused for %s", refused)
                    return False
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            logger.warning("commit failed (will retry): %s", exc.args[0])
            return False
        self._committed(points)
        return True

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        refused = [p for p in partitions if error is not None or p.error is not None]
        if refused:
            self.tracker.commit_failed([(p.topic, p.partition) for p in refused])  # committed again next tick
            cause = error or refused[0].error
            # A commit sent just before a rebalance carries the old generation: expected, and retried.
            level = logging.INFO if cause.code() in _REBALANCE_ERRORS else logging.WARNING
            logger.log(level, "offset commit failed for %s (will retry): %s",
                       [f"{p.topic}[{p.partition}]" for p in refused], cause)

    @contextmanager
    def revoking(self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False) -> Iterator[None]:
        if not self._failed() and not lost:
            self.producer.flush(REVOKE_FLUSH_S)  # results already produced get acknowledged...
            self.commit(tps, wait=broker_ok)  # ...and their inputs committed before the partitions go
        yield

    def close(self, deadline: float, broker_ok: bool) -> bool:
        unsent = self.producer.flush(max(deadline - time.monotonic(), 0.5))
        if unsent:
            logger.warning("%d records were not acknowledged before the shutdown deadline", unsent)
        if self._failed():
            return False
        if not broker_ok:
            logger.warning("broker unreachable at shutdown: the last offsets are not committed")
            return False
        return self.commit(wait=True) and unsent == 0


class ExactlyOnce(_Base):
    """One transaction per batch: results, dead letters and input offsets commit together or not at all."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._transaction = threading.Lock()
        self._rewinds_lock = threading.Lock()
        self._rewinds: dict[TopicPartitionKey, int | None] = {}
        self._group_metadata = None
        self._metadata_read_at = 0.0
        self._refused_lock = threading.Lock()
        self._refused: set[tuple[str, int, int, str, bool]] = set()

    def rebalanced(self) -> None:
        # The consumer is read on the poll thread only: consumer_group_metadata() called from
        # another thread while a rebalance callback runs blocks (librdkafka 2.16, measured), so the
        # inference thread uses this copy. A stale copy is safe: the broker refuses its offsets
        # (ILLEGAL_GENERATION), the transaction aborts and the batch is redone.
        self._metadata_read_at = time.monotonic()
        try:
            metadata = self.consumer.consumer_group_metadata()
        except (KafkaException, RuntimeError) as exc:  # closing: the last copy serves
            logger.debug("cannot read the group metadata: %s", exc)
            return
        if names_a_member(metadata):
            self._group_metadata = metadata

    def start(self, stopping: threading.Event) -> None:
        while True:
            try:
                self.producer.init_transactions(TRANSACTION_CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable():
                    raise
                if stopping.is_set():
                    return
                logger.warning("cannot initialise transactions yet (%s); retrying", error)

    @contextmanager
    def batch(self) -> Iterator[Send]:
        with self._transaction:
            self.producer.begin_transaction()
            began = time.monotonic()
            sent: list[OutgoingRecord] = []

            def send(record: OutgoingRecord) -> OutgoingRecord | None:
                if not self.tracker.is_current(record.source_tp, record.epoch):
                    return None
                with self._refused_lock:
                    refused = record.fallback is not None and record.shape in self._refused
                if refused:  # the broker refused it in an aborted attempt: settle the input otherwise
                    return send(record.fallback(topic_limit(record.topic)))
                try:
                    self._produce(record, self._on_delivery(record))
                except _TooLarge:
                    return send(record.fallback(PRODUCER_LIMIT))
                sent.append(record)
                return record

            try:
                yield send
            except BaseException:
                self._abort({record.source_tp for record in sent}, "the batch failed")
                raise
            if not sent:
                self._call(self.producer.abort_transaction)  # nothing to publish: end the empty transaction
                return
            if self._failed():
                self._abort(set(), "the service is stopping on an unrecoverable error")
                return
            for record in sent:
                self.tracker.done(record.source_tp, record.source.offset(), record.epoch)
            touched = {record.source_tp for record in sent}
            points = self.tracker.commit_points(sorted(touched))
            try:
                if points:
                    offsets = [TopicPartition(t, p, o) for (t, p), o in points.items()]
                    self._call(self.producer.send_offsets_to_transaction, offsets, self._group_metadata)
                self._call(self.producer.commit_transaction)
            except _AbortNeeded as abort:
                self._abort(touched, str(abort))
                return
            self._committed(points)
            with self._refused_lock:
                self._refused -= {record.shape for record in sent}
            for record in sent:
                self._count(record, began)

    def _on_delivery(self, record: OutgoingRecord) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(error: KafkaError | None, _published: Message) -> None:
            # Any failed record fails the whole transaction (commit_transaction says so); a record
            # the broker refused as too large is remembered, so the retry publishes its fallback.
            if error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE and record.fallback is not None:
                logger.warning("broker refused %s for %s[%d]@%d as too large", record.outcome, *record.source_tp,
                               record.source.offset())
                with self._refused_lock:
                    self._refused.add(record.shape)

        return on_delivery

    def _call(self, method: Callable, *args) -> None:
        """Call a transactional method, retrying what is retriable; `_AbortNeeded` if the transaction
        must be aborted; a fatal error (this producer was fenced) propagates and stops the service."""
        while True:
            try:
                method(*args, TRANSACTION_CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal():
                    raise
                if error.txn_requires_abort():
                    raise _AbortNeeded(error.str()) from None
                if not error.retriable():
                    raise
                logger.warning("%s: %s; retrying", method.__name__, error)

    def _abort(self, tps: set[TopicPartitionKey], reason: str) -> None:
        logger.warning("aborting the transaction (%s); rewinding %s to their committed offsets", reason, sorted(tps))
        try:
            self._call(self.producer.abort_transaction)
        except _AbortNeeded as exc:
            raise RuntimeError(f"cannot abort the transaction: {exc}") from None
        with self._rewinds_lock:
            for tp in tps:
                # Held from now on: records the poll loop already fetched past the aborted ones must
                # not be processed (and committed) before the partition is rewound.
                start = self.tracker.hold(tp)
                if start is not None or tp not in self._rewinds:
                    self._rewinds[tp] = start

    def tick(self) -> None:
        if time.monotonic() - self._metadata_read_at >= GROUP_METADATA_REFRESH_S:
            self.rebalanced()
        with self._rewinds_lock:
            rewinds, self._rewinds = self._rewinds, {}
        if not rewinds:
            return
        assigned = {(p.topic, p.partition) for p in self.consumer.assignment()}
        owned = [tp for tp in rewinds if tp in assigned]
        if not owned:
            return
        try:
            committed = self.consumer.committed([TopicPartition(t, p) for t, p in owned], timeout=10)
        except KafkaException as exc:
            logger.warning("cannot read committed offsets to rewind (%s); retrying", exc.args[0])
            with self._rewinds_lock:
                self._rewinds = {**rewinds, **self._rewinds}
            return
        for partition in committed:
            tp = (partition.topic, partition.partition)
            offset = partition.offset if partition.offset >= 0 else rewinds[tp]
            try:
                self.consumer.seek(TopicPartition(tp[0], tp[1], OFFSET_BEGINNING if offset is None else offset))
            except KafkaException as exc:
                logger.warning("cannot rewind %s[%d] (%s); retrying", tp[0], tp[1], exc.args[0])
                with self._rewinds_lock:
                    self._rewinds.setdefault(tp, rewinds[tp])
                continue
            self.tracker.assign(tp)  # a new epoch: what was in flight for it is dropped
            logger.info("rewound %s[%d] to offset %s after an aborted transaction", tp[0], tp[1], offset)

    @contextmanager
    def revoking(self, tps: list[TopicPartitionKey], broker_ok: bool, lost: bool = False) -> Iterator[None]:
        # The transaction in progress ends first (with the new generation's metadata if it has not
        # sent its offsets yet; a lost member's metadata is refused, so its transaction aborts), and
        # no later one can carry a revoked partition.
        self.rebalanced()
        acquired = self._transaction.acquire(timeout=REVOKE_WAIT_S)
        if not acquired:
            logger.warning("revoking %s while a transaction is still open; it will be fenced", tps)
        try:
            yield
        finally:
            if acquired:
                self._transaction.release()

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        return None  # offsets are committed inside transactions, never by the consumer

    def close(self, deadline: float, broker_ok: bool) -> bool:
        return not self._failed()


_REBALANCE_ERRORS = {KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID}


PRODUCER_LIMIT = "the producer's message.max.bytes"


def topic_limit(topic: str) -> str:
    return f"what {topic} accepts (max.message.bytes)"


class _TooLarge(Exception):
    """produce() refused a record as larger than message.max.bytes, and it has a fallback."""


class _AbortNeeded(Exception):
    """The transaction cannot commit and must be aborted (abortable, not fatal)."""
