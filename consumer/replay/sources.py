"""Reading a dead letter's original input back from source.topic/partition/offset, while it is held."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition

from consumer.events import REPLAY_COUNT_HEADER
from consumer.replay.selection import (
    BATCH_SIZE,
    METADATA_TIMEOUT,
    SEEK_GAP,
    STALL_TIMEOUT,
    RecordRef,
    ReplayError,
    ReplayExit,
    Source,
    SourceRecord,
    Unavailable,
    header_value,
)

logger = logging.getLogger(__name__)


class SourceReader:
    """Reads input records back by their coordinates, sequentially where they lie close together."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self._watermarks: dict[tuple[str, int], tuple[int, int]] = {}

    def fetch(self, refs: Sequence[RecordRef]) -> dict[RecordRef, Source]:
        found: dict[RecordRef, Source] = {}
        by_partition: dict[tuple[str, int], list[int]] = {}
        for ref in refs:
            by_partition.setdefault((ref.topic, ref.partition), []).append(ref.offset)
        for (topic, partition), offsets in sorted(by_partition.items()):
            found.update(self._fetch_partition(topic, partition, sorted(set(offsets))))
        return found

    def _fetch_partition(self, topic: str, partition: int, offsets: list[int]) -> dict[RecordRef, Source]:
        found: dict[RecordRef, Source] = {}
        try:
            low, high = self._watermarks_of(topic, partition)
        except KafkaException as exc:
            why = Unavailable(f"{topic}[{partition}] cannot be read: {exc.args[0].str()}")
            return {RecordRef(topic, partition, offset): why for offset in offsets}
        wanted = []
        for offset in offsets:
            if offset < low:
                found[RecordRef(topic, partition, offset)] = Unavailable(
                    f"{topic}[{partition}]@{offset} is no longer retained ({topic}[{partition}] starts at {low})"
                )
            elif offset >= high:
                found[RecordRef(topic, partition, offset)] = Unavailable(
                    f"{topic}[{partition}] ends at {high}, before {offset}"
                )
            else:
                wanted.append(offset)
        if not wanted:
            return found
        self.consumer.assign([KafkaTopicPartition(topic, partition, wanted[0])])
        index, last_progress = 0, time.monotonic()
        while index < len(wanted):
            messages = self.consumer.consume(BATCH_SIZE, timeout=0.5)
            if not messages and time.monotonic() - last_progress > STALL_TIMEOUT:
                raise ReplayError(
                    f"no record from {topic}[{partition}] for {STALL_TIMEOUT:.0f} s", ReplayExit.UNREACHABLE
                )
            for message in messages:
                last_progress = time.monotonic()
                error, at = message.error(), message.offset()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    logger.warning("reading %s[%d]: %s", topic, partition, error.str())
                    continue
                # At the end of the partition, everything wanted and not seen is not there.
                offset = high if error is not None or at is None else at
                while index < len(wanted) and wanted[index] < offset:
                    found[RecordRef(topic, partition, wanted[index])] = Unavailable(
                        f"{topic}[{partition}]@{wanted[index]} holds no record (compacted, or a transaction marker)"
                    )
                    index += 1
                if error is not None:
                    break
                if index < len(wanted) and wanted[index] == offset:
                    found[RecordRef(topic, partition, offset)] = SourceRecord(
                        message.key(), message.value(), header_value(message, REPLAY_COUNT_HEADER)
                    )
                    index += 1
                if index < len(wanted) and wanted[index] - offset > SEEK_GAP:
                    self.consumer.seek(KafkaTopicPartition(topic, partition, wanted[index]))
                    break  # what this call returned beyond the seek position is not wanted
        return found

    def _watermarks_of(self, topic: str, partition: int) -> tuple[int, int]:
        if (topic, partition) not in self._watermarks:
            low, high = self.consumer.get_watermark_offsets(
                KafkaTopicPartition(topic, partition), timeout=METADATA_TIMEOUT
            )
            self._watermarks[(topic, partition)] = (low, high)
        return self._watermarks[(topic, partition)]
