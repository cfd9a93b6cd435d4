"""Headers that travel: what of an input record's headers its result and its dead letter carry on.

- W3C trace context (`traceparent`, `tracestate`, `baggage`) and every header matched by
  PROPAGATE_HEADERS (comma-separated names or globs, case-insensitive) are copied unchanged onto the
  result and the dead letter, so a trace that began upstream goes on past this service. A header
  larger than MAX_PROPAGATED_HEADER_BYTES is dropped, and `propagation.dropped` names it. Names this
  service writes itself (`error.*`, `source.*`, `retry.*`, `event.id`, `replay.count`, `propagation.*`,
  `ce_*`) are never copied from the input. With tracing on (consumer/tracing/), `traceparent` and
  `tracestate` are the event span's instead of the input's.
- CloudEvents, Kafka protocol binding, binary mode: an input with `ce_specversion` is a CloudEvent,
  and its result is a CloudEvent of its own: `ce_specversion` 1.0, a new `ce_id`, `ce_type`
  (CLOUDEVENTS_TYPE), `ce_source` (CLOUDEVENTS_SOURCE), `ce_time`, the input's `ce_subject`, the
  input's `ce_id` as the extension `ce_correlationid`, the input's other extension attributes, and
  `content-type: application/json`. A dead letter keeps the input's `ce_*` headers as they were.
"""

from __future__ import annotations

import fnmatch
import uuid
from datetime import datetime, timezone
from typing import Mapping

from consumer.settings import Settings

Header = tuple[str, "bytes | None"]
"""An input record's header, as consumed."""
OutHeader = tuple[str, "str | bytes | None"]
"""A header of a record to produce."""

TRACE_CONTEXT = ("traceparent", "tracestate", "baggage")
MAX_PROPAGATED_HEADER_BYTES = 8192
"""A propagated header's name and value together at most; W3C allows tracestate 512 and baggage 8192."""
MAX_PROPAGATED_HEADERS = 32
"""More matching headers than this are dropped (and named in `propagation.dropped`)."""
DROPPED = "propagation.dropped"
_OWN_PREFIXES = ("error.", "source.", "retry.", "propagation.", "ce_")
_OWN_NAMES = {"event.id", "replay.count", "content-type"}
CE_PREFIX = "ce_"
CE_SPECVERSION = "ce_specversion"
# Context attributes the result sets itself (or that describe the input's payload, not the result's).
_CE_OWN = {"ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "ce_subject", "ce_datacontenttype",
           "ce_dataschema", "ce_correlationid"}  # fmt: skip


def propagated(
    headers: tuple[Header, ...], settings: Settings, trace_context: Mapping[str, bytes] | None = None
) -> list[OutHeader]:
    """The input headers its result and dead letter carry on, with `propagation.dropped` if any was too large.

    `trace_context`, when given (tracing on: consumer/tracing.py), is the event span's `traceparent`
    and `tracestate`: they replace the input's, which are not copied."""
    patterns = [name.lower() for name in TRACE_CONTEXT] + list(settings.propagate_header_patterns())
    kept: list[OutHeader] = [(name, value) for name, value in (trace_context or {}).items()]
    replaced = {name.lower() for name in trace_context or {}} | (
        {"traceparent", "tracestate"} if trace_context else set()
    )
    dropped: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in _OWN_NAMES or lowered.startswith(_OWN_PREFIXES) or lowered in replaced:
            continue
        if not any(fnmatch.fnmatchcase(lowered, pattern) for pattern in patterns):
            continue
        size = len(name.encode("utf-8", "backslashreplace")) + len(value or b"")
        if size > MAX_PROPAGATED_HEADER_BYTES or len(kept) >= MAX_PROPAGATED_HEADERS:
            dropped.append(name)
            continue
        kept.append((name, value))
    if dropped:
        kept.append((DROPPED, ",".join(dropped).encode("utf-8", "backslashreplace")[:1024]))
    return kept


def is_cloud_event(headers: tuple[Header, ...]) -> bool:
    return any(name == CE_SPECVERSION for name, _ in headers)


def cloud_event_of(headers: tuple[Header, ...]) -> list[OutHeader]:
    """The input's own `ce_*` headers, unchanged (what a dead letter keeps)."""
    return [(name, value) for name, value in headers if name.startswith(CE_PREFIX)]


def result_cloud_event(headers: tuple[Header, ...], settings: Settings) -> list[OutHeader]:
    """The result's CloudEvent attributes, when its input was a CloudEvent (else none)."""
    if not is_cloud_event(headers):
        return []
    attributes = {name: value for name, value in headers if name.startswith(CE_PREFIX)}
    result: list[OutHeader] = [
        (CE_SPECVERSION, b"1.0"),
        ("ce_id", str(uuid.uuid4()).encode()),
        ("ce_type", settings.cloudevents_type.encode()),
        ("ce_source", settings.cloudevents_source.encode()),
        ("ce_time", datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()),
        ("content-type", b"application/json"),
    ]
    if "ce_subject" in attributes:
        result.append(("ce_subject", attributes["ce_subject"]))
    if "ce_id" in attributes:
        result.append(("ce_correlationid", attributes["ce_id"]))
    result.extend((name, value) for name, value in attributes.items() if name not in _CE_OWN)
    return result
