"""What replay decides for a dead letter, without a broker: the filters, the count, the input read back.

With a broker (records sent, progress committed, a second run sending nothing):
tests/integration/test_replay.py.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
from confluent_kafka import Message
from hypothesis import given
from hypothesis import strategies as st

from consumer.events import DeadLetterHeaders
from consumer.replay import (
    DeadLetter,
    Filters,
    SourceRecord,
    Unavailable,
    check_source,
    decide,
    parse_time,
    read_dead_letter,
    replay_group,
)
from consumer.settings import Settings

NOON = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)


def message(headers: dict[str, str | None], key: bytes | None = b"k", value: bytes | None = b"v", when=NOON) -> Message:
    defaults = {
        "error.stage": "fetch",
        "error.class": "FetchError",
        "error.message": "timed out",
        "error.reason": "timeout",
        "error.attempts": "3",
        "source.topic": "in",
        "source.partition": "2",
        "source.offset": "40",
        "event.id": "e1",
    }
    chosen = DeadLetterHeaders.model_validate({**defaults, **headers}).kafka_headers()
    return Message(
        topic="dlq",
        partition=0,
        offset=7,
        key=key,
        value=value,
        headers=[(name, value.encode()) for name, value in chosen],
        timestamp=(1, int(when.timestamp() * 1000)),
    )


def letter(headers: dict[str, str | None] | None = None, **fields) -> DeadLetter:
    read = read_dead_letter(message(headers or {}, **fields))
    assert isinstance(read, DeadLetter), read
    return read


def test_a_dead_letter_is_read_from_the_headers_the_service_writes():
    read = letter({"replay.count": "2"})
    assert (str(read.ref), str(read.source)) == ("dlq[0]@7", "in[2]@40")
    assert read.headers.error_stage == "fetch" and read.headers.replay_count == "2"
    assert read.timestamp_ms == int(NOON.timestamp() * 1000)
    assert not read.needs_source  # it carries its key, value and count
    assert letter().needs_source  # no count of its own: the input's header says it
    foreign = Message(topic="dlq", partition=0, offset=1, value=b"x", headers=[("trace", b"1")])
    assert "not a dead letter of this service" in read_dead_letter(foreign)


def test_times_are_iso_8601_and_utc_unless_they_say_otherwise():
    assert parse_time("2026-11-30T12:00Z") == NOON
    assert parse_time("2026-11-30T12:00") == NOON
    assert parse_time("2026-11-30T13:00+01:00") == NOON
    assert parse_time("2026-11-30") == datetime(2026, 11, 30, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_each_given_filter_must_match_and_any_of_its_values_does():
    dead = letter()
    assert Filters().matches(dead)
    assert Filters(stages=frozenset({"fetch", "decode"}), reasons=frozenset({"timeout"})).matches(dead)
    assert not Filters(stages=frozenset({"fetch"}), reasons=frozenset({"http_404"})).matches(dead)
    assert not Filters(error_classes=frozenset({"DecodeError"})).matches(dead)
    assert Filters(event_ids=frozenset({"e1"})).matches(dead)
    assert not Filters(event_ids=frozenset({"e2"})).matches(dead)
    # since inclusive, until exclusive
    assert Filters(since=NOON).matches(dead) and not Filters(until=NOON).matches(dead)
    assert not Filters(since=parse_time("2026-11-30T12:00:01Z")).matches(dead)


names = st.frozensets(st.sampled_from(["fetch", "decode", "timeout", "e1", "e2", "FetchError"]), max_size=3)


@given(stages=names, reasons=names, event_ids=names)
def test_the_group_is_the_same_for_the_same_choice_and_another_for_another(stages, reasons, event_ids):
    settings = Settings.from_environ({"KAFKA_GROUP_ID": "diagrams"})
    chosen = Filters(stages=stages, reasons=reasons, event_ids=event_ids, since=parse_time("2026-11-30T13:00+01:00"))
    again = Filters(
        stages=frozenset(sorted(stages, reverse=True)),
        reasons=reasons,
        event_ids=event_ids,
        since=parse_time("2026-11-30T12:00Z"),
    )
    group = replay_group(settings, chosen)
    assert group.startswith("diagrams-replay-") and group == replay_group(settings, again)
    assert group != replay_group(settings, Filters(stages=stages | {"infer"}, reasons=reasons, event_ids=event_ids))
    other_topic = Settings.from_environ({"KAFKA_GROUP_ID": "diagrams", "DLQ_TOPIC": "other-dlq"})
    assert group != replay_group(other_topic, chosen)


def test_the_count_comes_from_the_dead_letter_else_its_input_else_counts_as_zero():
    own = decide(letter({"replay.count": "1"}), SourceRecord(b"k", b"v", "2"), 3, "in", 3)
    assert (own.action, own.count) == ("send", 2)  # the dead letter's own header wins
    from_input = decide(letter(), SourceRecord(b"k", b"v", "2"), 3, "in", 3)
    assert (from_input.action, from_input.count) == ("send", 3)
    original = decide(letter(), SourceRecord(b"k", b"v", None), 3, "in", 3)
    assert (original.action, original.count, original.note) == ("send", 1, None)
    gone = decide(letter(), Unavailable("in[2]@40 is no longer retained"), 3, "in", 3)
    assert (gone.action, gone.count) == ("send", 1) and "counted as 0" in gone.note
    refused = decide(letter(), SourceRecord(b"k", b"v", "3"), 3, "in", 3)
    assert (refused.action, refused.count) == ("refused", 3) and "--max-replays 3" in refused.note
    garbled = decide(letter({"replay.count": "many"}), None, 3, "in", 3)
    assert garbled.action == "refused"


def test_a_value_left_out_or_a_hashed_key_comes_back_from_the_input_or_the_dead_letter_is_reported():
    key, value = b"k" * 300, b"v" * 5000
    cut = letter(
        {"error.value_omitted": str(len(value)), "error.key_hashed": str(len(key)), "replay.count": "1"},
        key=hashlib.sha256(key).hexdigest().encode(),
        value=None,
    )
    source = check_source(cut, SourceRecord(key, value, None))
    sent = decide(cut, source, 3, "in", 3)
    assert (sent.action, sent.key, sent.value, sent.count) == ("send", key, value, 2)
    missing = decide(cut, Unavailable("in[2]@40 is no longer retained"), 3, "in", 3)
    assert missing.action == "unavailable" and "no longer retained" in missing.note
    # Offsets of a topic created again name other records: not this dead letter's input.
    assert isinstance(check_source(cut, SourceRecord(key, b"other", None)), Unavailable)
    assert isinstance(check_source(letter(), SourceRecord(b"other", b"v", None)), Unavailable)


def test_a_replay_goes_back_to_the_partition_it_came_from():
    assert decide(letter(), SourceRecord(b"k", b"v", None), 3, "in", 3).partition == 2
    assert decide(letter(), SourceRecord(b"k", b"v", None), 3, "elsewhere", 3).partition is None
    assert decide(letter(), SourceRecord(b"k", b"v", None), 3, "in", 2).partition is None
