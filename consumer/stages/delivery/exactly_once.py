"""Exactly-once (PROCESSING_GUARANTEE=exactly_once): one Kafka transaction per batch holds the batch's
results, its dead letters and the input offsets they complete.

Offsets go in with `send_offsets_to_transaction` and the consumer's group metadata (KIP-447). If the
transaction has to be aborted (a rebalance moved the group on, a record was refused), the batch's
partitions are rewound to their committed offsets and processed again; a reader with
`isolation.level=read_committed` never sees the aborted attempt.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from consumer.offsets import TopicPartitionKey
from consumer.stages.base import OutgoingRecord
from consumer.stages.delivery.base import DeliveryBase, Refused, Send, broker_refusal

logger = logging.getLogger(__name__)

TRANSACTION_CALL_TIMEOUT_S = 10.0
"""Per call to the transaction coordinator; a timed-out call is retried, for up to TRANSACTION_RETRY_S."""
TRANSACTION_RETRY_S = 60.0
"""How long retriable errors of one transactional call are retried (transaction.timeout.ms, librdkafka's
default, after which the coordinator aborts the transaction anyway); then the replica stops: its
broker is not answering."""
GROUP_METADATA_REFRESH_S = 1.0
"""How often the poll thread re-reads the group metadata sent with each transaction."""


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


class ExactlyOnce(DeliveryBase):
    """One transaction per batch: results, dead letters and input offsets commit together or not at all."""

    def __init__(self, *args: Any, revoke_timeout: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.revoke_timeout = revoke_timeout
        """REVOKE_TIMEOUT: how long a revocation waits for the transaction in progress to end."""
        self._transaction = threading.Lock()
        self._rewinds_lock = threading.Lock()
        self._rewinds: dict[TopicPartitionKey, int | None] = {}
        self._group_metadata: Any = None
        self._metadata_read_at = 0.0
        self._refused_lock = threading.Lock()
        self._refused: dict[tuple[str, int, int, str, bool], str] = {}
        """Records the broker refused for good in an aborted attempt, and why."""

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

    def submit(self, records: list[OutgoingRecord]) -> None:
        with self._batch() as send:
            for record in records:
                if send(record) is record:
                    record.log_produced()

    def poll(self, timeout: float = 0.0) -> None:
        self.producer.poll(timeout)
        self.tick()

    @contextmanager
    def _batch(self) -> Iterator[Send]:
        with self._transaction:
            self.producer.begin_transaction()
            began = time.monotonic()
            sent: list[OutgoingRecord] = []

            def send(record: OutgoingRecord) -> OutgoingRecord | None:
                if not self.tracker.is_current(record.source_tp, record.epoch):
                    return None
                with self._refused_lock:
                    why = self._refused.get(record.shape) if record.fallback is not None else None
                if why is not None:  # the broker refused it in an aborted attempt: settle the input otherwise
                    assert record.fallback is not None
                    return send(record.fallback(why))
                try:
                    self._produce(record, self._on_delivery(record))
                except Refused as refusal:
                    assert record.fallback is not None
                    logger.warning("producer refused %s for %s: %s", record.outcome, record.source, refusal.why)
                    return send(record.fallback(refusal.why))
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
            if self.latch.tripped():
                self._abort(set(), "the service is stopping on an unrecoverable error")
                return
            for record in sent:
                self.tracker.done(record.source_tp, record.source.offset, record.epoch)
            touched = {record.source_tp for record in sent}
            points = self.tracker.commit_points(sorted(touched))
            # A partition revoked while this transaction was open (REVOKE_TIMEOUT ran out) may be missing
            # from `points`: its results must not commit without its offsets, so the transaction aborts
            # and its new owner redoes them. Revoked after this check, its offsets go in with the
            # transaction, and the new owner's read of them waits for it to end (KIP-447).
            revoked = {tp for tp in touched if not self.tracker.is_current(tp, self._epoch_of(sent, tp))}
            if revoked:
                self._abort(touched - revoked, f"{sorted(revoked)} revoked meanwhile")
                return
            try:
                if points:
                    offsets = [TopicPartition(t, p, o) for (t, p), o in points.items()]
                    self._call(self.producer.send_offsets_to_transaction, offsets, self._group_metadata)
                self._call(self.producer.commit_transaction)
            except AbortNeeded as abort:
                self._abort(touched, str(abort))
                return
            self._committed(points)
            with self._refused_lock:
                for record in sent:
                    self._refused.pop(record.shape, None)
            for record in sent:
                self._count(record, began)

    @staticmethod
    def _epoch_of(sent: list[OutgoingRecord], tp: TopicPartitionKey) -> int:
        return next(record.epoch for record in sent if record.source_tp == tp)

    def _on_delivery(self, record: OutgoingRecord) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(error: KafkaError | None, _published: Message) -> None:
            # Any failed record fails the whole transaction (commit_transaction says so); a record
            # the broker refused for good is remembered, so the retry publishes its fallback.
            why = broker_refusal(record, error)
            if why is not None:
                logger.warning("broker refused %s for %s: %s", record.outcome, record.source, why)
                with self._refused_lock:
                    self._refused[record.shape] = why

        return on_delivery

    def _call(self, method: Callable[..., Any], *args: Any) -> None:
        """Call a transactional method, retrying what is retriable; `_AbortNeeded` if the transaction
        must be aborted; a fatal error (this producer was fenced), or retriable errors for longer than
        TRANSACTION_RETRY_S, propagate and stop the service."""
        deadline = time.monotonic() + TRANSACTION_RETRY_S
        while True:
            try:
                method(*args, TRANSACTION_CALL_TIMEOUT_S)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal():
                    raise
                if error.txn_requires_abort():
                    raise AbortNeeded(error.str()) from None
                if not error.retriable() or time.monotonic() > deadline:
                    raise
                logger.warning("%s: %s; retrying", method.__name__, error)

    def _abort(self, tps: set[TopicPartitionKey], reason: str) -> None:
        logger.warning("aborting the transaction (%s); rewinding %s to their committed offsets", reason, sorted(tps))
        try:
            self._call(self.producer.abort_transaction)
        except AbortNeeded as exc:
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
        wait = self._revocation_wait(self.revoke_timeout)
        acquired = self._transaction.acquire(timeout=wait)
        if not acquired:
            # The open transaction aborts itself before committing once it sees a partition revoked
            # (see _batch); only one already inside commit_transaction can still commit its results.
            logger.warning("revoking %s while a transaction is still open after %.0f s", tps, wait)
        try:
            yield
        finally:
            if acquired:
                self._transaction.release()

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        return None  # offsets are committed inside transactions, never by the consumer

    def join(self, timeout: float, between: Callable[[], None] | None = None) -> bool:
        self._shutdown_deadline = time.monotonic() + max(timeout, 0.0)
        return not self.latch.tripped()


class AbortNeeded(Exception):
    """The transaction cannot commit and must be aborted (abortable, not fatal)."""
