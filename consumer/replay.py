"""`python -m consumer replay`: chosen dead letters sent back to the input topic, each at most a few times.

It reads DLQ_TOPIC from where its consumer group left off up to the end the topic had when the run
began (read_committed: dead letters of aborted transactions are never replayed). Each dead letter
that matches every filter (error.stage, error.class, error.reason, event.id, record time) goes back to
INPUT_TOPIC with its input's key and value and a `replay.count` header one above the count it had;
at --max-replays it is refused instead, so an event that keeps failing cannot loop.

The count it had: the dead letter's own `replay.count` header when it carries one (the input's,
copied), else the header of the input record itself, read from source.topic/partition/offset while
that topic still holds it; an input no longer held counts as never replayed. The same read brings
back a value the dead letter left out (`error.value_omitted`) and a key it replaced by its SHA-256
(`error.key_hashed`); where the input is gone, that dead letter is reported and not sent.

Progress is the consumer group's committed offsets on DLQ_TOPIC, committed after each batch's
records are acknowledged by the broker: a second run with the same filters sends nothing again, and
a run stopped between the acknowledgement and the commit sends that batch again (at least once).
The group is named after the filters unless --group names one; --dry-run prints what it would send
and commits nothing.

Output: one JSON line per matching dead letter on stdout (what was done with it and why), progress
and a summary on stderr. Exit status: `ReplayExit`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from enum import IntEnum
from typing import Any, Literal, NamedTuple, TextIO

from confluent_kafka import OFFSET_INVALID, Consumer, IsolationLevel, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from pydantic import ValidationError

from consumer.clients import admin_config
from consumer.errors import STAGES
from consumer.events import REPLAY_COUNT_HEADER, DeadLetterHeaders
from consumer.logs import kafka_client_logger
from consumer.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_MAX_REPLAYS = 3
BATCH_SIZE = 500
"""Dead letters read before their replays are produced, acknowledged, and the group's offsets committed."""
METADATA_TIMEOUT = 10.0
"""Seconds to wait for the brokers' first answer (metadata, offsets) before giving up."""
STALL_TIMEOUT = 60.0
"""Seconds without a record or an end of partition while reading: the run stops, keeping its progress."""
SEEK_GAP = 500
"""Reading inputs back: a gap of more records than this is crossed by seeking, a smaller one read through."""
PROGRESS_INTERVAL = 0.5
"""Seconds between progress updates on a terminal (ten times this elsewhere, one line each)."""

Action = Literal["send", "refused", "unavailable"]


class ReplayExit(IntEnum):
    """`python -m consumer replay`'s exit status (2 is argparse's, for arguments it refuses)."""

    DONE = 0
    """Every dead letter up to the end was handled: sent, refused or reported as unavailable."""
    UNREACHABLE = 1
    """The brokers or a topic could not be read; nothing more was committed."""
    SEND_FAILED = 3
    """A record could not be sent; progress is committed up to the dead letter before it."""
    INTERRUPTED = 130
    """Ctrl-C or SIGTERM: progress is kept up to the last acknowledged batch."""


class ReplayError(Exception):
    """The run cannot go on; `exit_code` says why."""

    def __init__(self, message: str, exit_code: ReplayExit) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- what to replay --------------------------------------------------------------------------------
def parse_time(text: str) -> datetime:
    """An ISO 8601 date or date-time (`2026-11-30`, `2026-11-30T14:05`, `...Z`, `...+01:00`); one
    without an offset is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        try:
            day = date.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"not an ISO 8601 date or time: {text!r}") from None
        moment = datetime(day.year, day.month, day.day)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class Filters:
    """Which dead letters to replay: each given filter must match (any of its values), none given
    matches every dead letter. The time range is the dead letter's record timestamp, since inclusive,
    until exclusive."""

    stages: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, dead_letter: DeadLetter) -> bool:
        headers = dead_letter.headers
        chosen = (
            (self.stages, headers.error_stage),
            (self.error_classes, headers.error_class),
            (self.reasons, headers.error_reason),
            (self.event_ids, headers.event_id),
        )
        if any(values and value not in values for values, value in chosen):
            return False
        if self.since is None and self.until is None:
            return True
        if dead_letter.timestamp_ms is None:
            return False
        moment = datetime.fromtimestamp(dead_letter.timestamp_ms / 1000, timezone.utc)
        return (self.since is None or moment >= self.since) and (self.until is None or moment < self.until)

    def as_dict(self) -> dict[str, Any]:
        """The filters in a canonical form: the same choice gives the same dict, whatever the order."""
        return {
            "stages": sorted(self.stages),
            "error_classes": sorted(self.error_classes),
            "reasons": sorted(self.reasons),
            "event_ids": sorted(self.event_ids),
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }

    def describe(self) -> str:
        given = {name: value for name, value in self.as_dict().items() if value}
        return ", ".join(f"{name}={value}" for name, value in given.items()) or "every dead letter"


def replay_group(settings: Settings, filters: Filters) -> str:
    """The consumer group that records a replay's progress: `<KAFKA_GROUP_ID>-replay-<digest>`, the
    digest of the filters and the two topics, so the same choice continues where it stopped (and a
    group prefix ACL for the service's group covers it)."""
    choice = {"dead_letters": settings.dlq_topic, "input": settings.input_topic, **filters.as_dict()}
    digest = hashlib.sha256(json.dumps(choice, sort_keys=True).encode()).hexdigest()[:12]
    return f"{settings.kafka_group_id}-replay-{digest}"


@dataclass(frozen=True)
class ReplayOptions:
    filters: Filters = field(default_factory=Filters)
    max_replays: int = DEFAULT_MAX_REPLAYS
    """A record that has been sent back this many times is refused."""
    dry_run: bool = False
    group: str | None = None
    """The consumer group recording progress; None names it after the filters (`replay_group`)."""


# -- one dead letter -------------------------------------------------------------------------------
class RecordRef(NamedTuple):
    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class DeadLetter:
    """A record of DLQ_TOPIC written by this service: its coordinates, key, value and headers."""

    ref: RecordRef
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: DeadLetterHeaders
    source: RecordRef
    """The input record it stands for (source.topic, source.partition, source.offset)."""

    @property
    def needs_source(self) -> bool:
        """Whether the input record must be read: for a value left out, a hashed key, or a count the
        dead letter does not carry."""
        headers = self.headers
        return (
            headers.error_value_omitted is not None
            or headers.error_key_hashed is not None
            or headers.replay_count is None
        )


def read_dead_letter(message: Message) -> DeadLetter | str:
    """The dead letter a consumed record is, or why it is none of this service's."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    headers: dict[str, str] = {}
    for name, raw in header_items(message):
        if isinstance(raw, bytes):
            try:
                headers[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"header {name} is not UTF-8"
        elif raw is not None:
            headers[name] = raw
    try:
        parsed = DeadLetterHeaders.model_validate(headers)
        source = RecordRef(parsed.source_topic, int(parsed.source_partition), int(parsed.source_offset))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return f"not a dead letter of this service ({problems})"
    except ValueError:
        return "source.partition or source.offset is not a number"
    kind, timestamp = message.timestamp()
    return DeadLetter(
        ref=RecordRef(topic, partition, offset),
        timestamp_ms=timestamp if kind != 0 and timestamp >= 0 else None,  # 0: TIMESTAMP_NOT_AVAILABLE
        key=message.key(),
        value=message.value(),
        headers=parsed,
        source=source,
    )


@dataclass(frozen=True)
class SourceRecord:
    """The input record a dead letter stands for, read back from its topic."""

    key: bytes | None
    value: bytes | None
    replay_count: str | None


@dataclass(frozen=True)
class Unavailable:
    """Why the input record cannot be read back."""

    why: str


Source = SourceRecord | Unavailable


def check_source(dead_letter: DeadLetter, record: SourceRecord) -> Source:
    """`record` if it is the input `dead_letter` stands for: its key (or the key's SHA-256) and its
    value (or the value's size) agree; else why not. Offsets of a topic deleted and created again
    name other records."""
    headers = dead_letter.headers
    if headers.error_key_hashed is not None:
        key = record.key or b""
        same_key = hashlib.sha256(key).hexdigest().encode() == dead_letter.key
        same_key = same_key and str(len(key)) == headers.error_key_hashed
    else:
        same_key = record.key == dead_letter.key
    if headers.error_value_omitted is not None:
        same_value = str(len(record.value or b"")) == headers.error_value_omitted
    else:
        same_value = record.value == dead_letter.value
    if same_key and same_value:
        return record
    return Unavailable(f"{dead_letter.source} holds another record than the dead letter's (topic recreated?)")


@dataclass(frozen=True)
class Replay:
    """What becomes of one matching dead letter."""

    dead_letter: DeadLetter
    action: Action
    count: int
    """The replay.count the record sent carries; for one refused, the count it already has."""
    key: bytes | None = None
    value: bytes | None = None
    partition: int | None = None
    """The input partition to send to: the one it came from, when that is INPUT_TOPIC's; else the
    producer's partitioner decides by key."""
    note: str | None = None


def decide(
    dead_letter: DeadLetter, source: Source | None, max_replays: int, input_topic: str, input_partitions: int
) -> Replay:
    """Send, refuse (at `max_replays`) or report as unavailable (its key or value cannot be read back).

    `source` is the input record read back, or why it could not be, or None when it was not needed."""
    headers, notes = dead_letter.headers, []
    counted = headers.replay_count
    if counted is None and isinstance(source, SourceRecord):
        counted = source.replay_count
    elif counted is None and isinstance(source, Unavailable):
        notes.append(f"replay.count unknown, counted as 0: {source.why}")
    try:
        previous = int(counted or 0)
    except ValueError:
        return Replay(dead_letter, "refused", 0, note=f"replay.count {counted!r} is not a number")
    if previous >= max_replays:
        note = f"sent back {previous} times already (--max-replays {max_replays})"
        return Replay(dead_letter, "refused", previous, note=note)
    key, value = dead_letter.key, dead_letter.value
    for header, what in ((headers.error_key_hashed, "key"), (headers.error_value_omitted, "value")):
        if header is None:
            continue
        if not isinstance(source, SourceRecord):
            why = source.why if source is not None else "not read"
            return Replay(dead_letter, "unavailable", previous, note=f"the dead letter has no {what}; {why}")
        if what == "key":
            key = source.key
        else:
            value = source.value
        notes.append(f"{what} read back from {dead_letter.source}")
    same_topic = dead_letter.source.topic == input_topic and 0 <= dead_letter.source.partition < input_partitions
    partition = dead_letter.source.partition if same_topic else None
    return Replay(dead_letter, "send", previous + 1, key, value, partition, "; ".join(notes) or None)


# -- Kafka ------------------------------------------------------------------------------------------
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


def header_items(message: Message) -> list[tuple[str, str | bytes | None]]:
    headers = message.headers()
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def header_value(message: Message, name: str) -> str | None:
    for header, raw in header_items(message):
        if header == name and raw is not None:
            return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return None


class Progress:
    """A line on stderr: dead letters read of those to read, and what became of the matching ones."""

    def __init__(self, stream: TextIO, total: int, dry_run: bool, group: str) -> None:
        self.stream, self.total, self.dry_run, self.group = stream, total, dry_run, group
        self.tty = stream.isatty()
        self.read = 0
        self.counts: Counter[str] = Counter()
        self._shown_at = time.monotonic()  # a run shorter than one interval shows its final line only
        self._shown = ""

    def line(self) -> str:
        sent = "would send" if self.dry_run else "sent"
        done = f"{self.read}/{self.total}" if self.total else str(self.read)
        return (
            f"replay: {done} dead letters read, {self.counts['matched']} matching: {self.counts['send']} {sent}, "
            f"{self.counts['refused']} refused, {self.counts['unavailable']} unavailable"
            + (f", {self.counts['unreadable']} not this service's" if self.counts["unreadable"] else "")
        )

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        interval = PROGRESS_INTERVAL if self.tty else PROGRESS_INTERVAL * 10
        if not final and now - self._shown_at < interval:
            return
        line = self.line()
        if final:
            line += " (dry run: nothing sent or committed)" if self.dry_run else f" (progress: group {self.group})"
        elif line == self._shown:
            return
        self._shown_at, self._shown = now, line
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + ("\n" if final or not self.tty else ""))
        self.stream.flush()


class Replayer:
    """One run: reads, decides, sends, commits, reports. `run` returns the exit status."""

    def __init__(self, settings: Settings, options: ReplayOptions, out: TextIO, err: TextIO) -> None:
        self.settings, self.options, self.out, self.err = settings, options, out, err
        self.group = options.group or replay_group(settings, options.filters)

    # -- client configs ------------------------------------------------------------------------
    def _consumer_config(self) -> dict[str, Any]:
        config = self.settings.consumer_config()
        config.pop("group.instance.id", None)  # the service's static membership is not this tool's
        config.update(
            {
                "group.id": self.group,
                "client.id": self.settings.client_id(self.group),
                "enable.partition.eof": True,
                "logger": kafka_client_logger("librdkafka.replay"),
            }
        )
        return config

    def _producer_config(self) -> dict[str, Any]:
        config = self.settings.producer_config()
        config.pop("transactional.id", None)
        config.update(
            {"client.id": self.settings.client_id(self.group), "logger": kafka_client_logger("librdkafka.replay")}
        )
        return config

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        settings, options = self.settings, self.options
        logger.info(
            "replaying %s -> %s as group %s: %s%s",
            settings.dlq_topic,
            settings.input_topic,
            self.group,
            options.filters.describe(),
            " (dry run: nothing is sent or committed)" if options.dry_run else "",
        )
        consumer = Consumer(self._consumer_config())
        sources = Consumer({**self._consumer_config(), "group.id": f"{self.group}-sources"})
        producer = None if options.dry_run else Producer(self._producer_config())
        admin = AdminClient({**admin_config(self._producer_config())})
        progress: Progress | None = None
        failure: ReplayError | None = None
        try:
            dead_letter_partitions = self._partition_count(consumer, settings.dlq_topic)
            input_partitions = self._partition_count(consumer, settings.input_topic)
            ranges = self._ranges(consumer, admin, dead_letter_partitions)
            progress = Progress(
                self.err, sum(end - start for start, end in ranges.values()), options.dry_run, self.group
            )
            self._read(consumer, SourceReader(sources), producer, input_partitions, ranges, progress)
        except ReplayError as exc:
            failure = exc
        except KeyboardInterrupt:
            failure = ReplayError(
                "interrupted; progress is kept up to the last acknowledged batch", ReplayExit.INTERRUPTED
            )
        finally:
            sources.close()
            consumer.close()
            if producer is not None:
                producer.flush(METADATA_TIMEOUT)
        # Last, after the clients' own log lines, so the reason is what a person reads at the end.
        if progress is not None:
            progress.show(final=True)
        if failure is not None:
            self.err.write(f"replay: {failure}\n")
            return failure.exit_code
        return ReplayExit.DONE

    def _partition_count(self, consumer: Consumer, topic: str) -> int:
        try:
            metadata = consumer.list_topics(topic, timeout=METADATA_TIMEOUT)
        except KafkaException as exc:
            raise ReplayError(
                f"cannot reach the Kafka brokers at {self.settings.kafka_bootstrap_servers} within "
                f"{METADATA_TIMEOUT:.0f} s ({exc.args[0].str()}); check KAFKA_BOOTSTRAP_SERVERS and the "
                "KAFKA_SECURITY_*/SASL_* settings",
                ReplayExit.UNREACHABLE,
            ) from None
        described = metadata.topics.get(topic)
        error = getattr(described, "error", None)
        if described is None or error is not None or not described.partitions:
            why = error.str() if isinstance(error, KafkaError) else "no such topic"
            raise ReplayError(f"topic {topic} cannot be read: {why}", ReplayExit.UNREACHABLE)
        return len(described.partitions)

    def _ranges(self, consumer: Consumer, admin: AdminClient, partitions: int) -> dict[int, tuple[int, int]]:
        """Per dead-letter partition, the offsets to read: from the group's committed offset (or the
        start, or --since) to the last stable offset now."""
        topic, since = self.settings.dlq_topic, self.options.filters.since
        tps = [KafkaTopicPartition(topic, partition) for partition in range(partitions)]
        try:
            committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=METADATA_TIMEOUT)}
            starts = self._list_offsets(admin, tps, OffsetSpec.earliest())  # type: ignore[no-untyped-call]
            ends = self._list_offsets(admin, tps, OffsetSpec.latest())  # type: ignore[no-untyped-call]
            since_offsets = (
                self._list_offsets(admin, tps, OffsetSpec.for_timestamp(int(since.timestamp() * 1000)))
                if since is not None
                else {}
            )
        except KafkaException as exc:
            raise ReplayError(
                f"cannot read the offsets of {topic}: {exc.args[0].str()}", ReplayExit.UNREACHABLE
            ) from None
        ranges = {}
        for partition in range(partitions):
            end = ends[partition]
            start = max(starts[partition], committed.get(partition, OFFSET_INVALID))
            if since is not None:
                # -1: no dead letter at or after --since on this partition.
                start = max(start, since_offsets[partition] if since_offsets[partition] >= 0 else end)
            ranges[partition] = (min(start, end), end)
        return ranges

    @staticmethod
    def _list_offsets(admin: AdminClient, tps: list[KafkaTopicPartition], spec: OffsetSpec) -> dict[int, int]:
        futures = admin.list_offsets(
            {tp: spec for tp in tps}, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=METADATA_TIMEOUT
        )
        return {tp.partition: future.result().offset for tp, future in futures.items()}

    def _read(
        self,
        consumer: Consumer,
        sources: SourceReader,
        producer: Producer | None,
        input_partitions: int,
        ranges: dict[int, tuple[int, int]],
        progress: Progress,
    ) -> None:
        topic = self.settings.dlq_topic
        pending = {partition: end for partition, (start, end) in ranges.items() if start < end}
        if pending:
            consumer.assign([KafkaTopicPartition(topic, partition, ranges[partition][0]) for partition in pending])
        batch: list[Message] = []
        last_progress = time.monotonic()
        while pending or batch:
            messages = consumer.consume(BATCH_SIZE - len(batch), timeout=0.5) if pending else []
            for message in messages:
                partition, offset, error = message.partition(), message.offset(), message.error()
                assert partition is not None and offset is not None
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        if offset >= pending.get(partition, 0):
                            pending.pop(partition, None)
                    else:
                        logger.warning("reading %s[%d]: %s", topic, partition, error.str())
                    continue
                if partition not in pending or offset >= pending[partition]:
                    continue  # written after the run began: the next run's
                batch.append(message)
                if offset + 1 >= pending[partition]:
                    del pending[partition]
            if messages:
                last_progress = time.monotonic()
            elif pending and time.monotonic() - last_progress > STALL_TIMEOUT:
                raise ReplayError(
                    f"no record from {topic} for {STALL_TIMEOUT:.0f} s with partitions {sorted(pending)} not read "
                    "to their end; progress is kept up to the last acknowledged batch",
                    ReplayExit.UNREACHABLE,
                )
            if batch and (len(batch) >= BATCH_SIZE or not pending):
                self._settle(batch, consumer, sources, producer, input_partitions, progress)
                batch = []

    def _settle(
        self,
        batch: list[Message],
        consumer: Consumer,
        sources: SourceReader,
        producer: Producer | None,
        input_partitions: int,
        progress: Progress,
    ) -> None:
        """One batch: decide each dead letter, send, wait for the acknowledgements, commit, report."""
        options, settings = self.options, self.settings
        matching: list[DeadLetter] = []
        for message in batch:
            dead_letter = read_dead_letter(message)
            if isinstance(dead_letter, str):
                progress.counts["unreadable"] += 1
                logger.warning(
                    "skipping %s[%s]@%s: %s", message.topic(), message.partition(), message.offset(), dead_letter
                )
            elif options.filters.matches(dead_letter):
                matching.append(dead_letter)
        read_back = sources.fetch([dead_letter.source for dead_letter in matching if dead_letter.needs_source])
        replays = [
            decide(
                dead_letter,
                read_back.get(dead_letter.source),
                options.max_replays,
                settings.input_topic,
                input_partitions,
            )
            for dead_letter in matching
        ]
        failures = self._send(producer, [replay for replay in replays if replay.action == "send"])
        if producer is not None:
            self._commit(consumer, batch, failures)
        for replay in replays:
            failure = failures.get(replay.dead_letter.ref)
            self._report(replay, failure)
            if failure is None:
                progress.counts[replay.action] += 1
            progress.counts["matched"] += 1
        progress.read += len(batch)
        progress.show()
        if failures:
            first = min(failures.items(), key=lambda item: item[0].offset)
            raise ReplayError(
                f"{len(failures)} record(s) could not be sent, the first for {first[0]}: {first[1]}; progress is "
                "committed up to the dead letter before it",
                ReplayExit.SEND_FAILED,
            )

    def _send(self, producer: Producer | None, replays: list[Replay]) -> dict[RecordRef, str]:
        """Produce each replay and wait for its acknowledgement; what failed, by dead letter."""
        if producer is None or not replays:
            return {}
        topic = self.settings.input_topic
        outcome: dict[RecordRef, str | None] = {}

        def acknowledged(ref: RecordRef) -> Any:
            def on_delivery(error: KafkaError | None, _message: Message) -> None:
                outcome[ref] = None if error is None else error.str()

            return on_delivery

        for replay in replays:
            ref = replay.dead_letter.ref
            while True:
                try:
                    producer.produce(
                        topic,
                        value=replay.value,
                        key=replay.key,
                        headers=[(REPLAY_COUNT_HEADER, str(replay.count))],
                        partition=-1 if replay.partition is None else replay.partition,  # -1: by key
                        on_delivery=acknowledged(ref),
                    )
                    break
                except BufferError:
                    producer.poll(0.5)  # the local queue is full: let acknowledgements free it
                except KafkaException as exc:
                    outcome[ref] = exc.args[0].str()
                    break
            producer.poll(0)
        producer.flush()  # until each is acknowledged or message.timeout.ms runs out
        failures = {}
        for replay in replays:
            ref = replay.dead_letter.ref
            if ref not in outcome:
                failures[ref] = "not acknowledged"
            elif outcome[ref] is not None:
                failures[ref] = str(outcome[ref])
        return failures

    def _commit(self, consumer: Consumer, batch: list[Message], failures: dict[RecordRef, str]) -> None:
        """Commit past the batch, or on a partition with a failed send, up to the first one."""
        topic = self.settings.dlq_topic
        next_offsets: dict[int, int] = {}
        for message in batch:
            partition, offset = message.partition(), message.offset()
            assert partition is not None and offset is not None
            next_offsets[partition] = max(next_offsets.get(partition, 0), offset + 1)
        for ref in failures:
            next_offsets[ref.partition] = min(next_offsets[ref.partition], ref.offset)
        offsets = [KafkaTopicPartition(topic, partition, offset) for partition, offset in sorted(next_offsets.items())]
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            raise ReplayError(
                f"the batch was sent but its progress could not be committed ({exc.args[0].str()}): a second run "
                "sends it again",
                ReplayExit.UNREACHABLE,
            ) from None

    def _report(self, replay: Replay, failure: str | None) -> None:
        dead_letter, headers = replay.dead_letter, replay.dead_letter.headers
        action: str = replay.action
        if replay.action == "send":
            action = "would_send" if self.options.dry_run else ("failed" if failure else "sent")
        line: dict[str, Any] = {
            "dead_letter": str(dead_letter.ref),
            "event_id": headers.event_id,
            "stage": headers.error_stage,
            "error_class": headers.error_class,
            "reason": headers.error_reason,
            "action": action,
            "replay_count": replay.count,
        }
        if replay.action == "send":
            partition = "" if replay.partition is None else f"[{replay.partition}]"
            line["to"] = f"{self.settings.input_topic}{partition}"
        note = failure or replay.note
        if note:
            line["note"] = note
        self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.out.flush()


# -- the command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    def time_argument(text: str) -> datetime:
        try:
            return parse_time(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def count_argument(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("must be at least 1")
        return value

    chosen = parser.add_argument_group(
        "which dead letters (each given filter must match; repeat one for any of several)"
    )
    chosen.add_argument("--stage", action="append", choices=STAGES, default=[], help="header error.stage")
    chosen.add_argument("--error-class", action="append", default=[], metavar="CLASS", help="header error.class")
    chosen.add_argument("--reason", action="append", default=[], help="header error.reason")
    chosen.add_argument("--event-id", action="append", default=[], metavar="ID", help="header event.id")
    chosen.add_argument(
        "--since",
        type=time_argument,
        metavar="TIME",
        help="dead-lettered at or after this ISO 8601 time (UTC if no offset)",
    )
    chosen.add_argument("--until", type=time_argument, metavar="TIME", help="dead-lettered before this ISO 8601 time")
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent; send and commit nothing")
    parser.add_argument(
        "--max-replays",
        type=count_argument,
        default=DEFAULT_MAX_REPLAYS,
        metavar="N",
        help=f"refuse a record sent back N times already (default {DEFAULT_MAX_REPLAYS})",
    )
    parser.add_argument(
        "--group", help="consumer group recording progress (default: <KAFKA_GROUP_ID>-replay-<digest of the filters>)"
    )


def options_from(args: argparse.Namespace) -> ReplayOptions:
    filters = Filters(
        stages=frozenset(args.stage),
        error_classes=frozenset(args.error_class),
        reasons=frozenset(args.reason),
        event_ids=frozenset(args.event_id),
        since=args.since,
        until=args.until,
    )
    return ReplayOptions(filters=filters, max_replays=args.max_replays, dry_run=args.dry_run, group=args.group)


def run_replay(settings: Settings, options: ReplayOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    return Replayer(settings, options, out, err).run()
