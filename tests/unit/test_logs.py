"""Logs: JSON lines carry each event's fields; librdkafka's repeated lines are thinned out."""

from __future__ import annotations

import json
import logging

from consumer.logs import JsonFormatter, RepeatFilter, event_fields


def test_json_log_lines_carry_the_event_fields():
    record = logging.LogRecord("consumer.pipeline", logging.INFO, __file__, 1, "described %s", ("x",), None)
    for key, value in event_fields("order-17", "in", 2, 1045, "ok", inference_time=1.5).items():
        setattr(record, key, value)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "described x"
    assert {k: entry[k] for k in ("id", "topic", "partition", "offset", "outcome", "inference_time")} == {
        "id": "order-17",
        "topic": "in",
        "partition": 2,
        "offset": 1045,
        "outcome": "ok",
        "inference_time": 1.5,
    }


def test_repeated_log_lines_are_let_through_once_per_interval():
    repeat = RepeatFilter(interval_s=30)

    def record(message: str, created: float) -> logging.LogRecord:
        entry = logging.makeLogRecord({"msg": message})
        entry.created = created
        return entry

    assert repeat.filter(record("connection refused", 100.0))
    assert not repeat.filter(record("connection refused", 110.0))
    assert repeat.filter(record("another message", 110.0))
    assert repeat.filter(record("connection refused", 131.0))
