"""Retry records (RETRY_DELAYS): what their headers say, how they are read back however mangled, and
where an event goes after each failed attempt. The records stage that builds the hops and the dead
letters from these: tests/unit/stages/test_records.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import FetchError
from consumer.events import MAX_HISTORY_CHARS
from consumer.settings import Settings
from consumer.stages.base import InputRecord
from consumer.stages.retry import MAX_ERROR_CHARS, Origin, RetryPolicy, RetryState, error_entry, history_json

SETTINGS = Settings.from_environ({}, input_topic="events", retry_delays="1m,10m")
POLICY = RetryPolicy(SETTINGS)
INPUT = InputRecord("events", 2, 41, b"k", b"{}", headers=(("traceparent", b"00-ab-cd-01"),))
TRANSIENT = FetchError("image URL answered HTTP 503", reason="http_503", retryable=True)


def retry_record(topic: str, headers: list[tuple[str, bytes | None]], offset: int = 7) -> InputRecord:
    return InputRecord(topic, 0, offset, b"k", b"{}", headers=tuple(headers))


def test_an_input_record_is_the_first_attempt_and_its_own_origin():
    state = POLICY.state_of(INPUT)
    assert state == RetryState(attempt=1, origin=Origin("events", 2, 41))
    assert POLICY.due_ms(INPUT) is None and POLICY.attempts == 3
    assert POLICY.topics == {"events-retry-60s", "events-retry-600s"}


def test_each_transient_failure_goes_to_the_next_delay_until_the_last_has_passed():
    assert POLICY.next_topic(RetryState(1, Origin("events", 2, 41)), TRANSIENT) == ("events-retry-60s", 60_000)
    assert POLICY.next_topic(RetryState(2, Origin("events", 2, 41)), TRANSIENT) == ("events-retry-600s", 600_000)
    assert POLICY.next_topic(RetryState(3, Origin("events", 2, 41)), TRANSIENT) is None
    permanent = FetchError("HTTP 404", reason="http_404")
    assert POLICY.next_topic(RetryState(1, Origin("events", 2, 41)), permanent) is None
    without = RetryPolicy(Settings.from_environ({}, input_topic="events"))
    assert not without.enabled and without.next_topic(RetryState(1, Origin("events", 2, 41)), TRANSIENT) is None


def test_hop_headers_carry_the_input_headers_and_read_back_as_the_next_attempt():
    forged = InputRecord("events", 2, 41, b"k", b"{}", headers=(("traceparent", b"t"), ("retry.attempt", b"9")))
    headers = POLICY.hop_headers(forged, POLICY.state_of(forged), TRANSIENT, 60_000, now_ms=1_000)
    assert headers[0] == ("traceparent", b"t") and ("retry.attempt", b"9") not in headers
    written = dict(headers)
    assert written["retry.attempt"] == "2" and written["retry.due"] == "61000"
    assert written["retry.origin"] == "events/2/41"
    assert written["retry.first_error"] == "fetch/http_503: image URL answered HTTP 503"
    assert json.loads(written["retry.errors"]) == ["fetch/http_503: image URL answered HTTP 503"]

    consumed = retry_record("events-retry-60s", [(n, v.encode() if isinstance(v, str) else v) for n, v in headers])
    state = POLICY.state_of(consumed)
    assert (state.attempt, state.origin, state.due_ms) == (2, Origin("events", 2, 41), 61_000)
    assert state.errors == ("fetch/http_503: image URL answered HTTP 503",)
    timeout = FetchError("took over IMAGE_FETCH_TIMEOUT=10 s", reason="timeout", retryable=True)
    again = dict(POLICY.hop_headers(consumed, state, timeout, 600_000, now_ms=70_000))
    assert again["retry.attempt"] == "3" and again["retry.due"] == "670000" and again["retry.origin"] == "events/2/41"
    assert again["retry.first_error"] == written["retry.first_error"]  # the first error stays the first
    assert json.loads(again["retry.errors"]) == [
        "fetch/http_503: image URL answered HTTP 503",
        "fetch/timeout: took over IMAGE_FETCH_TIMEOUT=10 s",
    ]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("retry.attempt", b"two"), ("retry.due", b"soon"), ("retry.origin", b"nowhere"), ("retry.errors", b"{")],
        [("retry.attempt", None), ("retry.due", b"\xff"), ("retry.errors", b'{"not": "a list"}')],
        [("retry.attempt", b"0"), ("retry.errors", b'[1, null, "fetch/timeout: x"]')],
    ],
    ids=["none", "garbage", "not-text", "out-of-range"],
)
def test_a_mangled_retry_record_is_its_last_attempt(headers):
    """A retry record whose headers cannot be read never loops: its next failure is dead-lettered."""
    record = retry_record("events-retry-600s", headers)
    state = POLICY.state_of(record)
    assert state.attempt == POLICY.attempts and state.due_ms is None
    assert state.origin == Origin("events-retry-600s", 0, 7)  # where it was read, when it names no other
    assert all(isinstance(entry, str) for entry in state.errors)
    assert POLICY.next_topic(state, TRANSIENT) is None


def test_a_due_time_is_never_later_than_the_records_timestamp_and_its_delay():
    """A skewed or forged retry.due cannot stop a retry partition for longer than the topic's delay."""
    far = [("retry.due", b"99999999999999")]
    assert POLICY.due_ms(retry_record("events-retry-60s", far)) == 99999999999999  # no timestamp to go by
    published = InputRecord("events-retry-60s", 0, 7, b"k", b"{}", timestamp_ms=1_000, headers=tuple(far))
    assert POLICY.due_ms(published) == 61_000
    early = InputRecord("events-retry-60s", 0, 7, b"k", b"{}", timestamp_ms=1_000, headers=(("retry.due", b"5000"),))
    assert POLICY.due_ms(early) == 5_000
    unreadable = InputRecord("events-retry-600s", 0, 7, b"k", b"{}", timestamp_ms=1_000)
    assert POLICY.due_ms(unreadable) == 601_000


def test_retry_headers_on_an_input_record_are_not_read():
    forged = retry_record("events", [("retry.attempt", b"3"), ("retry.due", b"99999999999999")])
    assert POLICY.state_of(forged).attempt == 1 and POLICY.due_ms(forged) is None


@given(messages=st.lists(st.text(max_size=3000), min_size=1, max_size=17))
def test_history_is_a_bounded_json_array_keeping_the_first_and_the_latest(messages):
    entries = [error_entry(FetchError(message, reason="timeout", retryable=True)) for message in messages]
    assert all(len(entry) <= MAX_ERROR_CHARS and entry.encode("utf-8") for entry in entries)
    text = history_json(entries)
    assert len(text) <= MAX_HISTORY_CHARS
    shown = json.loads(text)
    assert shown[-1] == entries[-1]
    if len(shown) > 1:
        assert shown[0] == entries[0]
