"""Records: each outcome as the record that settles its input, a result or a dead letter.

Both are built from the contracts in consumer/events.py: a `DiagramResult` as the result's value, a
`DeadLetterHeaders` as the dead letter's headers (the dead letter's key and value are the input's).
A result that cannot be built (say, an id the JSON encoder refuses) is dead-lettered at the `result`
stage. Every record carries its fallback for when it cannot be published as it is (too large, or
refused by the producer): a result becomes a dead letter (`publish`), and a dead letter degrades step
by step until it fits: its value left out (header `error.value_omitted`), then its key replaced by the
key's SHA-256 (header `error.key_hashed`). Dead-letter headers are always valid UTF-8 and bounded
(`events.DeadLetterHeaders`), so the last step always fits a topic that accepts a few kilobytes.

With RETRY_DELAYS set, a transient failure becomes a retry hop instead: the input again, on the next
retry topic (consumer/stages/retry.py), until the last delay has passed; then the dead letter lists
every attempt's error. A result or dead letter of an event that came through the retry topics names
the original input as its source.
"""

from __future__ import annotations

import hashlib
import logging
import time

from consumer.engine.base import EngineInfo
from consumer.errors import ProcessingError, PublishError, ResultError
from consumer.events import (
    REPLAY_COUNT_HEADER,
    DeadLetterHeaders,
    DiagramResult,
    ResultMetadata,
    Source,
    description_fields,
)
from consumer.logs import event_fields
from consumer.metrics import Metrics
from consumer.result_cache.store import MAX_ENTRY_BYTES, cache_entry
from consumer.settings import Settings
from consumer.stages.base import (
    CACHE_OUTCOME,
    TOO_LARGE,
    Described,
    Failed,
    InputRecord,
    Outcome,
    OutgoingRecord,
    Stage,
)
from consumer.stages.headers import cloud_event_of, propagated, result_cloud_event
from consumer.stages.retry import RetryPolicy, error_entry, history_json
from consumer.tracing import NO_TRACING, Tracing

logger = logging.getLogger(__name__)


def replay_count(source: InputRecord) -> str | None:
    """The input's replay.count header (`python -m consumer replay` sets it), as text, if it has one."""
    value = next((value for name, value in source.headers if name == REPLAY_COUNT_HEADER), None)
    return value.decode("utf-8", "backslashreplace") if value is not None else None


# How far a dead letter has been cut down to fit: nothing, its value left out, its key hashed too, the
# input's headers that travel left out too (only the error.* and source.* headers remain).
FULL, VALUE_OMITTED, KEY_HASHED, BARE = 0, 1, 2, 3


class Records:
    def __init__(
        self,
        settings: Settings,
        engine: EngineInfo,
        metrics: Metrics,
        next_stage: Stage[list[OutgoingRecord]],
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings, self.engine, self.metrics, self.next = settings, engine, metrics, next_stage
        self.tracing = tracing
        self._on_settled = tracing.settled if tracing.enabled else None
        self.retries = RetryPolicy(settings)

    def submit(self, outcomes: list[Outcome]) -> None:
        records = []
        for outcome in outcomes:
            if isinstance(outcome, Failed):
                item = outcome.item
                records.append(self.failed(item.record, item.epoch, outcome.error, item.event_id))
            else:
                try:
                    records.append(self.result(outcome))
                except Exception as exc:  # noqa: BLE001 - one event's result must not stop the partition
                    item = outcome.item
                    error = ResultError.unexpected(exc)
                    records.append(self.dead_letter(item.record, item.epoch, error, item.event_id))
                    continue
                try:
                    entry = self.cache_record(outcome)
                except Exception:  # noqa: BLE001 - a cache entry is never worth an event
                    logger.warning("cannot build the result cache entry for %s", outcome.item.describe(), exc_info=True)
                    entry = None
                if entry is not None:
                    records.append(entry)
        self.next.submit(records)

    def poll(self, timeout: float = 0.0) -> None:
        self.next.poll(timeout)

    def join(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        return None

    # -- results -----------------------------------------------------------------------------------
    def result(self, described: Described) -> OutgoingRecord:
        item, info = described.item, self.engine
        adapter = described.generation.adapter
        source = item.record
        origin = self.retries.state_of(source).origin
        assert item.event is not None
        result = DiagramResult(
            **description_fields(described.generation.text),
            id=item.event.id,
            metadata=ResultMetadata(
                inference_time=round(time.monotonic() - item.polled_at, 4),
                generation_time=round(described.generation_time, 4),
                image_size=described.loaded.size,
                model=info.model,
                adapter=adapter.path if adapter else info.adapter,
                adapter_name=adapter.name if adapter else None,
                adapter_hash=adapter.hash if adapter else None,
                device=info.device,
                dtype=info.dtype,
                output_tokens=described.generation.output_tokens,
                batch_size=described.batch_size,
                source=Source(topic=origin.topic, partition=origin.partition, offset=origin.offset),
                content_hash=described.loaded.content_hash,
                result_key=described.result_key,
                cache=described.cache,
            ),
            input_metadata=item.event.metadata,
        )
        value = result.model_dump_json().encode()
        event_id = item.event.id

        def refused(why: str) -> OutgoingRecord:
            reason = "too_large" if why.startswith(TOO_LARGE) else "refused"
            error = PublishError(f"the result ({len(value)} bytes) was refused: {why}", reason=reason)
            return self.dead_letter(source, item.epoch, error, event_id)

        return OutgoingRecord(
            topic=self.settings.output_topic,
            key=source.key,
            value=value,
            headers=propagated(source.headers, self.settings, self.tracing.trace_headers(source))
            + result_cloud_event(source.headers, self.settings)
            or None,
            source=source,
            epoch=item.epoch,
            outcome="ok",
            event_id=event_id,
            fallback=refused,
            log_fields={
                "inference_time": result.metadata.inference_time,
                "generation_time": result.metadata.generation_time,
                "output_tokens": result.metadata.output_tokens,
                "batch_size": result.metadata.batch_size,
                "cache": result.metadata.cache,
            },
            on_settled=self._on_settled,
        )

    def cache_record(self, described: Described) -> OutgoingRecord | None:
        """The result cache entry a generated description leaves on RESULT_CACHE_TOPIC, keyed by its
        result key, published with its result (in the same transaction under exactly-once); None
        without a cache topic, for a hit, or for an entry over MAX_ENTRY_BYTES."""
        topic, key, item = self.settings.result_cache_topic, described.result_key, described.item
        if topic is None or key is None or described.cache != "miss":
            return None
        entry = cache_entry(described, self.engine)
        value = entry.encode() if entry is not None else None
        if value is None or len(value) > MAX_ENTRY_BYTES:
            return None
        return OutgoingRecord(
            topic=topic,
            key=key.encode(),
            value=value,
            headers=None,
            source=item.record,
            epoch=item.epoch,
            outcome=CACHE_OUTCOME,
            event_id=item.event_id,
        )

    # -- retries -----------------------------------------------------------------------------------
    def failed(self, source: InputRecord, epoch: int, error: ProcessingError, event_id: str | None) -> OutgoingRecord:
        """A failed event's record: a retry hop while its failure is transient and a delay is left,
        else its dead letter."""
        state = self.retries.state_of(source)
        hop = self.retries.next_topic(state, error)
        if hop is None:
            return self.dead_letter(source, epoch, error, event_id)
        topic, delay_ms = hop

        def unpublishable(why: str) -> OutgoingRecord:
            logger.warning(
                "cannot publish the retry of id=%s %s to %s (%s): dead-lettering it", event_id, source, topic, why
            )
            return self.dead_letter(source, epoch, error, event_id)

        logger.info(
            "retrying id=%s %s in %.3g s on %s after attempt %d of %d: %s failed (%s): %s",
            event_id,
            source,
            delay_ms / 1000,
            topic,
            state.attempt,
            self.retries.attempts,
            error.stage,
            error.reason,
            error.message[:200],
            extra=event_fields(
                event_id,
                source.topic,
                source.partition,
                source.offset,
                "retry_scheduled",
                stage=error.stage,
                reason=error.reason,
                attempt=state.attempt,
                retry_topic=topic,
            ),
        )
        return OutgoingRecord(
            topic=topic,
            key=source.key,
            value=source.value,
            headers=self.retries.hop_headers(source, state, error, delay_ms),
            source=source,
            epoch=epoch,
            outcome="retry_scheduled",
            event_id=event_id,
            fallback=unpublishable,
        )

    # -- dead letters ------------------------------------------------------------------------------
    def dead_letter(
        self, source: InputRecord, epoch: int, error: ProcessingError, event_id: str | None
    ) -> OutgoingRecord:
        state = self.retries.state_of(source)
        origin = state.origin
        headers = DeadLetterHeaders.model_validate(
            {
                "error.stage": error.stage,
                "error.class": error.error_class,
                "error.message": error.message,
                "error.reason": error.reason,
                "error.attempts": str(state.attempt - 1 + error.attempts),
                # After retry hops: every attempt's error, and the input the event first came from.
                "error.history": history_json([*state.errors, error_entry(error)]) if state.attempt > 1 else None,
                "source.topic": origin.topic,
                "source.partition": str(origin.partition),
                "source.offset": str(origin.offset),
                "event.id": event_id,
                REPLAY_COUNT_HEADER: replay_count(source),
            }
        )
        self.metrics.failures.labels(error.stage, error.reason).inc()
        logger.warning(
            "dead-lettering id=%s %s: %s failed (%s): %s",
            headers.event_id,
            source,
            error.stage,
            error.reason,
            headers.error_message,
            extra=event_fields(
                headers.event_id,
                source.topic,
                source.partition,
                source.offset,
                "dead_lettered",
                stage=error.stage,
                reason=error.reason,
                attempts=error.attempts,
            ),
        )
        oversized = len(source.value or b"") > self.settings.max_event_bytes
        return self._dead_letter_record(source, epoch, headers, headers.event_id, VALUE_OMITTED if oversized else FULL)

    def _dead_letter_record(
        self, source: InputRecord, epoch: int, headers: DeadLetterHeaders, event_id: str | None, level: int
    ) -> OutgoingRecord:
        """The input's key and value with the error headers, cut down to `level` (see the module doc)."""
        key, value = source.key, source.value
        if level >= VALUE_OMITTED and value is not None:
            headers = headers.model_copy(update={"error_value_omitted": str(len(value))})
            value = None
        if level >= KEY_HASHED and key is not None:
            headers = headers.model_copy(update={"error_key_hashed": str(len(key))})
            key = hashlib.sha256(key).hexdigest().encode()
        trace_context = self.tracing.trace_headers(source)
        travelling = (
            []
            if level >= BARE
            else propagated(source.headers, self.settings, trace_context) + cloud_event_of(source.headers)
        )
        next_level = level + 1 if level < BARE else None

        def smaller(_why: str) -> OutgoingRecord:
            assert next_level is not None
            return self._dead_letter_record(source, epoch, headers, event_id, next_level)

        return OutgoingRecord(
            topic=self.settings.dlq_topic,
            key=key,
            value=value,
            headers=headers.kafka_headers() + travelling,
            source=source,
            epoch=epoch,
            outcome="dead_lettered",
            event_id=event_id,
            fallback=smaller if next_level is not None else None,
            on_settled=self._on_settled,
        )
