"""The tracing interface the stages call, and its no-op (tracing off)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence, TypeVar

from consumer.stages.base import InputRecord, OutgoingRecord

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

T = TypeVar("T")
EventKey = tuple[str, int, int]
"""An input record by topic, partition and offset."""

MAX_OPEN_EVENTS = 10_000
"""Event spans kept open at most. An event whose partition was revoked never settles here; past this
many, the oldest open span is ended as abandoned."""
MAX_KEY_CHARS = 256
"""A message key longer than this is left out of messaging.kafka.message.key."""
ERROR_LOG_INTERVAL_S = 60.0
SHUTDOWN_FLUSH_MS = 5000


class Tracing:
    """The tracing the stages see. This base class records nothing (tracing off): every method is a
    no-op, and `trace_headers` returns None, so the input's trace context travels unchanged."""

    enabled = False

    def received(self, record: InputRecord, epoch: int, event_id: str | None) -> None:
        """An event entered the pipeline (resolve, poll-loop thread): its span starts."""

    @contextmanager
    def step(self, record: InputRecord, name: str) -> Iterator[None]:
        """A child span of the event's span around the body (fetch, decode, prepare)."""
        yield

    def generated(
        self, records: Sequence[InputRecord], started_ns: int, ended_ns: int, error: BaseException | None
    ) -> None:
        """One model call over `records` (infer, inference thread), from `started_ns` to `ended_ns`
        (time.time_ns()): a batch span, and a linked child of each event's span."""

    def trace_headers(self, record: InputRecord) -> dict[str, bytes] | None:
        """The trace context an outgoing record of `record` carries (traceparent, tracestate), or None
        to copy the input's unchanged."""
        return None

    def settled(self, record: OutgoingRecord, produced_at: float) -> None:
        """The event's result or dead letter was acknowledged (delivery): its span ends."""

    def shutdown(self) -> None:
        """Export what is left (waits up to a few seconds)."""


NO_TRACING = Tracing()
