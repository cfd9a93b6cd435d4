"""Retries that hold no slot (RETRY_DELAYS): what a retry record carries, and where an event goes next.

A transient failure (a fetch timeout, a 5xx or 429 answer, a refused connection, EAI_AGAIN: the
`ProcessingError`s marked `retryable`) does not wait in-process. The records stage publishes the event
again, key and value unchanged, to the retry topic of the next delay (`Settings.retry_topic`), with
these headers besides every header of the original input (so the result or dead letter that finally
settles the event carries what it would have carried from the input: trace context, CloudEvent
attributes, `replay.count`):

- `retry.attempt`: the number of the attempt this record is for (2 on the first retry topic);
- `retry.first_error`: the first attempt's error, `stage/reason: message`;
- `retry.errors`: every attempt's error so far, a JSON array of `stage/reason: message` strings;
- `retry.due`: when the next attempt is due, epoch milliseconds;
- `retry.origin`: the original input record, `topic/partition/offset`.

All are valid UTF-8 and bounded. The service consumes its retry topics in the same group as the
input; intake holds a record that is not due yet and pauses its partition until it is (records of a
retry topic come due in offset order: they share one delay). A retry hop is published and committed
like a result: at-least-once commits the consumed offset once the hop is acknowledged, exactly-once
puts the hop in the batch's transaction. After the last delay the event is dead-lettered with every
attempt's error (`error.history`) and the original input's coordinates (`source.*`), so replay sends
it back to the input topic.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import NamedTuple

from consumer.errors import ProcessingError
from consumer.events import MAX_HEADER_CHARS, MAX_HISTORY_CHARS, header_text
from consumer.settings import Settings
from consumer.stages.base import InputRecord

PREFIX = "retry."
ATTEMPT = "retry.attempt"
FIRST_ERROR = "retry.first_error"
ERRORS = "retry.errors"
DUE = "retry.due"
ORIGIN = "retry.origin"

MAX_ERROR_CHARS = 200
"""One attempt's error in `retry.errors` and `error.history`, `stage/reason: message`, at most."""


class Origin(NamedTuple):
    """The input record an event was first consumed from."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        # Topic names never contain "/" (Kafka allows [a-zA-Z0-9._-]), so this splits back unambiguously.
        return f"{self.topic}/{self.partition}/{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Origin | None:
        topic, _, rest = text.partition("/")
        partition, _, offset = rest.partition("/")
        if not topic or not partition.isdigit() or not offset.isdigit():
            return None
        return cls(topic, int(partition), int(offset))


@dataclass(frozen=True)
class RetryState:
    """Where an event stands in its retries, as a consumed record says (its `retry.*` headers)."""

    attempt: int
    """The attempt this record is for: 1 for an input record."""
    origin: Origin
    errors: tuple[str, ...] = ()
    """The earlier attempts' errors, `stage/reason: message` each, oldest first."""
    first_error: str | None = None
    due_ms: int | None = None
    """When this attempt is due (epoch ms); None: at once."""


def error_entry(error: ProcessingError, limit: int = MAX_ERROR_CHARS) -> str:
    """One attempt's error as a history line: `stage/reason: message`, valid UTF-8, bounded."""
    return header_text(f"{error.stage}/{error.reason}: {error.message}", limit)


def history_json(entries: list[str], limit: int = MAX_HISTORY_CHARS) -> str:
    """`entries` as a JSON array of at most `limit` characters: the first and the latest are kept,
    and entries from the middle are replaced by one that says how many were left out."""
    kept, left_out = list(entries), 0
    while True:
        shown = kept if not left_out else [kept[0], f"... {left_out} more ...", *kept[1:]]
        text = json.dumps(shown, ensure_ascii=False)
        if len(text) <= limit or len(kept) <= 2:
            return text if len(text) <= limit else json.dumps([header_text(kept[-1], limit // 2)], ensure_ascii=False)
        del kept[1]
        left_out += 1


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None


class RetryPolicy:
    """RETRY_DELAYS applied: which topics are retry topics, what a consumed record's retry state is,
    and where a failed attempt goes next. With no delays nothing is a retry topic and nothing hops."""

    def __init__(self, settings: Settings) -> None:
        self.delays = settings.retry_delays
        self._topic_of = {delay: settings.retry_topic(delay) for delay in self.delays}
        self._delay_of = {topic: delay for delay, topic in self._topic_of.items()}
        self.topics = frozenset(self._topic_of.values())

    @property
    def enabled(self) -> bool:
        return bool(self.delays)

    @property
    def attempts(self) -> int:
        """How many attempts an event gets in all: the first, and one after each delay."""
        return len(self.delays) + 1

    def state_of(self, record: InputRecord) -> RetryState:
        """The record's retry state. Only records of this service's retry topics have one besides the
        first attempt; their headers are read defensively (a header that cannot be read counts as the
        last attempt, due no later than its topic's delay after it was published, so a mangled record
        settles rather than loops)."""
        own = Origin(record.topic, record.partition, record.offset)
        if record.topic not in self.topics:
            return RetryState(attempt=1, origin=own)
        headers: dict[str, str | None] = {}
        for name, value in record.headers:
            if name.startswith(PREFIX) and name not in headers:
                headers[name] = _text(value)
        attempt_text = headers.get(ATTEMPT) or ""
        attempt = int(attempt_text) if attempt_text.isdigit() and int(attempt_text) >= 2 else self.attempts
        origin = Origin.parse(headers.get(ORIGIN) or "") or own
        due_text = headers.get(DUE) or ""
        due_ms = int(due_text) if due_text.isdigit() else None
        try:
            loaded = json.loads(headers.get(ERRORS) or "[]")
        except ValueError:
            loaded = []
        entries = loaded if isinstance(loaded, list) else []
        errors = tuple(header_text(entry, MAX_ERROR_CHARS) for entry in entries if isinstance(entry, str))
        first = headers.get(FIRST_ERROR)
        return RetryState(attempt, origin, errors, header_text(first) if first is not None else None, due_ms)

    def due_ms(self, record: InputRecord) -> int | None:
        """When a record of a retry topic is due (epoch ms); None for any other record (at once).

        Never later than the record's timestamp (when it was published) plus its topic's delay, and
        that when `retry.due` cannot be read: a mangled or skewed header cannot stop a partition for
        longer than its delay."""
        delay = self._delay_of.get(record.topic)
        if delay is None:
            return None
        due_ms = self.state_of(record).due_ms
        if record.timestamp_ms is None:
            return due_ms
        latest = record.timestamp_ms + delay
        return latest if due_ms is None else min(due_ms, latest)

    def next_topic(self, state: RetryState, error: ProcessingError) -> tuple[str, int] | None:
        """The retry topic and delay (ms) of the event's next attempt, or None when it is to be
        dead-lettered: a permanent failure, no delays configured, or the last delay passed."""
        if not error.retryable or state.attempt > len(self.delays):
            return None
        delay = self.delays[state.attempt - 1]
        return self._topic_of[delay], delay

    def hop_headers(
        self, record: InputRecord, state: RetryState, error: ProcessingError, delay_ms: int, now_ms: int | None = None
    ) -> list[tuple[str, str | bytes | None]]:
        """The retry record's headers: the input's own (not its `retry.*`), then the retry state."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        carried: list[tuple[str, str | bytes | None]] = [
            (name, value) for name, value in record.headers if not name.lower().startswith(PREFIX)
        ]
        first = state.first_error or error_entry(error, MAX_HEADER_CHARS)
        return [
            *carried,
            (ATTEMPT, str(state.attempt + 1)),
            (FIRST_ERROR, first),
            (ERRORS, history_json([*state.errors, error_entry(error)])),
            (DUE, str(now_ms + delay_ms)),
            (ORIGIN, str(state.origin)),
        ]
