"""Records: each outcome as the record that settles its input, a result or a dead letter.

Both are built from the contracts in consumer/events.py: a `DiagramResult` as the result's value, a
`DeadLetterHeaders` as the dead letter's headers (the dead letter's key and value are the input's).
Every record carries its fallback for when it is too large to publish: a result becomes a dead letter
(`publish`/`too_large`), a dead letter loses its value (header `error.value_omitted`).
"""

from __future__ import annotations

import logging
import time

from consumer.engine.base import EngineInfo
from consumer.errors import ProcessingError, PublishError
from consumer.events import DeadLetterHeaders, DiagramResult, ResultMetadata, Source
from consumer.logs import event_fields
from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.stages.base import Described, Failed, InputRecord, Outcome, OutgoingRecord, Stage

logger = logging.getLogger(__name__)

MAX_ERROR_MESSAGE_CHARS = 2000


class Records:
    def __init__(
        self, settings: Settings, engine: EngineInfo, metrics: Metrics, next_stage: Stage[list[OutgoingRecord]]
    ) -> None:
        self.settings, self.engine, self.metrics, self.next = settings, engine, metrics, next_stage

    def submit(self, outcomes: list[Outcome]) -> None:
        records = []
        for outcome in outcomes:
            if isinstance(outcome, Failed):
                item = outcome.item
                records.append(self.dead_letter(item.record, item.epoch, outcome.error, item.event_id))
            else:
                records.append(self.result(outcome))
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
        source = item.record
        assert item.event is not None
        result = DiagramResult(
            id=item.event.id,
            description=described.generation.text,
            metadata=ResultMetadata(
                inference_time=round(time.monotonic() - item.polled_at, 4),
                generation_time=round(described.generation_time, 4),
                image_size=described.loaded.size,
                model=info.model,
                adapter=info.adapter,
                device=info.device,
                output_tokens=described.generation.output_tokens,
                batch_size=described.batch_size,
                source=Source(topic=source.topic, partition=source.partition, offset=source.offset),
            ),
            input_metadata=item.event.metadata,
        )
        value = result.model_dump_json().encode()
        event_id = item.event.id

        def too_large(refused_by: str) -> OutgoingRecord:
            error = PublishError(f"result is {len(value)} bytes, more than {refused_by}", reason="too_large")
            return self.dead_letter(source, item.epoch, error, event_id)

        return OutgoingRecord(
            topic=self.settings.output_topic,
            key=source.key,
            value=value,
            headers=None,
            source=source,
            epoch=item.epoch,
            outcome="ok",
            event_id=event_id,
            fallback=too_large,
            log_fields={
                "inference_time": result.metadata.inference_time,
                "generation_time": result.metadata.generation_time,
                "output_tokens": result.metadata.output_tokens,
                "batch_size": result.metadata.batch_size,
            },
        )

    # -- dead letters ------------------------------------------------------------------------------
    def dead_letter(
        self, source: InputRecord, epoch: int, error: ProcessingError, event_id: str | None
    ) -> OutgoingRecord:
        headers = DeadLetterHeaders.model_validate(
            {
                "error.stage": error.stage,
                "error.class": type(error).__name__,
                "error.message": error.message[:MAX_ERROR_MESSAGE_CHARS],
                "error.reason": error.reason,
                "error.attempts": str(error.attempts),
                "source.topic": source.topic,
                "source.partition": str(source.partition),
                "source.offset": str(source.offset),
                "event.id": event_id,
            }
        )
        self.metrics.failures.labels(error.stage, error.reason).inc()
        logger.warning(
            "dead-lettering id=%s %s: %s failed (%s): %s",
            event_id,
            source,
            error.stage,
            error.reason,
            error.message,
            extra=event_fields(
                event_id,
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
        return self._dead_letter_record(source, epoch, headers, event_id, omit_value=oversized)

    def _dead_letter_record(
        self, source: InputRecord, epoch: int, headers: DeadLetterHeaders, event_id: str | None, omit_value: bool
    ) -> OutgoingRecord:
        """The input's key and value with the error headers; a value too large to send is left out
        (header error.value_omitted), so an oversized record cannot stop the partition."""
        value = source.value
        if omit_value and value is not None:
            headers = headers.model_copy(update={"error_value_omitted": str(len(value))})
            value = None

        def without_value(_refused_by: str) -> OutgoingRecord:
            return self._dead_letter_record(source, epoch, headers, event_id, omit_value=True)

        return OutgoingRecord(
            topic=self.settings.dlq_topic,
            key=source.key,
            value=value,
            headers=headers.kafka_headers(),
            source=source,
            epoch=epoch,
            outcome="dead_lettered",
            event_id=event_id,
            fallback=without_value if value is not None else None,
        )
