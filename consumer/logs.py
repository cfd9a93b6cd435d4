"""Logging setup: LOG_LEVEL, and LOG_FORMAT=json for one JSON object per line.

Per-event lines carry their fields as `extra=event_fields(...)`, so JSON logs have `id`, `topic`,
`partition`, `offset`, `outcome` and the timings as keys a log pipeline can index, while text logs
keep them in the message. librdkafka's own log lines and Python warnings are routed through the same
handler, so with LOG_FORMAT=json every line the service writes is JSON (a crash's traceback aside).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

# Libraries that install their own stderr handler; in JSON mode their lines must come through ours.
_LIBRARIES_WITH_HANDLERS = ("transformers", "huggingface_hub")


def event_fields(
    event_id: str | None, topic: str, partition: int, offset: int, outcome: str, **timings: Any
) -> dict[str, Any]:
    """The structured fields of one event's log line (pass as `extra=`)."""
    return {"id": event_id, "topic": topic, "partition": partition, "offset": offset, "outcome": outcome, **timings}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then every `extra=` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Lets a message through at most once per `interval_s`: librdkafka repeats a connection
    failure every few milliseconds for as long as a broker is down."""

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.created - self._last.get(message, float("-inf")) < self.interval_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[message] = record.created
        return True


def kafka_client_logger(name: str) -> logging.Logger:
    """The logger for a librdkafka client's own log lines (its `logger` property), repeats suppressed."""
    kafka_logger = logging.getLogger(name)
    if not any(isinstance(existing, RepeatFilter) for existing in kafka_logger.filters):
        kafka_logger.addFilter(RepeatFilter())
    return kafka_logger


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    for noisy in ("urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if fmt == "json":
        for name in _LIBRARIES_WITH_HANDLERS:
            _route_through_root(name)


def _route_through_root(name: str) -> None:
    """Make a library that configures its own stderr handler on import log through the root handler."""
    if name == "transformers":
        try:
            from transformers.utils import logging as transformers_logging
        except ImportError:
            return
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()
    elif name == "huggingface_hub":
        try:
            from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]
        except ImportError:
            return
        disable_progress_bars()
