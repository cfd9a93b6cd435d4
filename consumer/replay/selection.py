"""Which dead letters a replay run takes, and what it does with each: filters, the dead letter read
back, the decision to send or refuse it."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from enum import IntEnum
from typing import Any, Literal, NamedTuple

from confluent_kafka import Message
from pydantic import ValidationError

from consumer.events import DeadLetterHeaders
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
