"""`python -m consumer replay` against the real broker: dead letters crafted on the dead-letter topic
with the headers the service writes (consumer/events.py DeadLetterHeaders), their inputs on the input
topic, and the command run as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from consumer.events import DeadLetterHeaders
from tests.support import REPO_ROOT, Topics, read_to_end

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Input:
    key: bytes | None
    value: bytes
    partition: int
    offset: int


def produce_inputs(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, int, list | None]]
) -> list[Input]:
    """Produce (key, value, partition, headers) records and say where each landed."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    landed: list[Input] = []
    for key, value, partition, headers in records:
        producer.produce(
            topic,
            key=key,
            value=value,
            partition=partition,
            headers=headers,
            on_delivery=lambda error, message: landed.append(
                Input(message.key(), message.value(), message.partition(), message.offset())
            ),
        )
    assert producer.flush(30) == 0
    return sorted(landed, key=lambda record: records.index(next(r for r in records if r[1] == record.value)))


def dead_letter(
    bootstrap: str,
    topics: Topics,
    source: Input,
    *,
    stage: str = "fetch",
    reason: str = "timeout",
    error_class: str = "FetchError",
    event_id: str | None = None,
    omit_value: bool = False,
    hash_key: bool = False,
    replay_count: str | None = None,
    timestamp: datetime | None = None,
) -> None:
    """A dead letter as consumer/stages/records.py writes it for `source` (cut down as it cuts them)."""
    headers = {
        "error.stage": stage,
        "error.class": error_class,
        "error.message": f"{stage} failed: {reason}",
        "error.reason": reason,
        "error.attempts": "1",
        "source.topic": topics.input,
        "source.partition": str(source.partition),
        "source.offset": str(source.offset),
        "event.id": event_id,
        "replay.count": replay_count,
    }
    key, value = source.key, source.value
    if omit_value:
        headers["error.value_omitted"], value = str(len(value)), None
    if hash_key:
        headers["error.key_hashed"], key = str(len(key)), hashlib.sha256(key).hexdigest().encode()
    producer = Producer({"bootstrap.servers": bootstrap})
    extra = {"timestamp": int(timestamp.timestamp() * 1000)} if timestamp else {}
    producer.produce(
        topics.dlq, key=key, value=value, headers=DeadLetterHeaders.model_validate(headers).kafka_headers(), **extra
    )
    assert producer.flush(30) == 0


@dataclass
class Run:
    status: int
    lines: list[dict]
    stderr: str

    @property
    def by_event(self) -> dict[str, dict]:
        return {line["event_id"]: line for line in self.lines}


def replay(bootstrap: str, topics: Topics, *args: str, **env: str) -> Run:
    """`python -m consumer replay ARGS` with the service's topic settings."""
    environment = {
        **{name: value for name, value in os.environ.items() if not name.startswith("KAFKA_")},
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_GROUP_ID": topics.group,
        "INPUT_TOPIC": topics.input,
        "OUTPUT_TOPIC": topics.output,
        "DLQ_TOPIC": topics.dlq,
        **env,
    }
    finished = subprocess.run(
        [sys.executable, "-m", "consumer", "replay", *args],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.strip()]
    return Run(finished.returncode, lines, finished.stderr)


def replayed(bootstrap: str, topics: Topics, inputs: list[Input]) -> list:
    """The records on the input topic other than `inputs`: those replay sent."""
    produced = {(source.partition, source.offset) for source in inputs}
    return [
        record
        for record in read_to_end(bootstrap, topics.input)
        if (record.partition(), record.offset()) not in produced
    ]


def count_of(record) -> str:
    return dict(record.headers())["replay.count"].decode()


def test_replay_sends_exactly_the_chosen_dead_letters_once(kafka_bootstrap, topics):
    inputs = produce_inputs(
        kafka_bootstrap,
        topics.input,
        [(f"k{n}".encode(), f'{{"id": "e{n}"}}'.encode(), n % 3, None) for n in range(1, 6)],
    )
    e1, e2, e3, e4, e5 = inputs
    dead_letter(kafka_bootstrap, topics, e1, event_id="e1")
    dead_letter(kafka_bootstrap, topics, e2, event_id="e2", reason="http_404")
    dead_letter(kafka_bootstrap, topics, e3, event_id="e3", stage="decode", error_class="DecodeError")
    dead_letter(kafka_bootstrap, topics, e4, event_id="e4")
    dead_letter(kafka_bootstrap, topics, e5, event_id="e5", error_class="ConnectionResetError", reason="unexpected")
    Producer({"bootstrap.servers": kafka_bootstrap}).produce(topics.dlq, value=b"not a dead letter")
    chosen = ["--stage", "fetch", "--reason", "timeout", "--reason", "unexpected", "--error-class", "FetchError"]

    dry = replay(kafka_bootstrap, topics, *chosen, "--dry-run")
    assert dry.status == 0, dry.stderr
    assert {event: line["action"] for event, line in dry.by_event.items()} == {"e1": "would_send", "e4": "would_send"}
    assert replayed(kafka_bootstrap, topics, inputs) == []  # a dry run sends nothing

    first = replay(kafka_bootstrap, topics, *chosen)
    assert first.status == 0, first.stderr
    assert {event: line["action"] for event, line in first.by_event.items()} == {"e1": "sent", "e4": "sent"}
    sent = replayed(kafka_bootstrap, topics, inputs)
    assert sorted((r.key(), r.value(), r.partition(), count_of(r)) for r in sent) == [
        (e.key, e.value, e.partition, "1") for e in (e1, e4)
    ]
    assert "2 matching: 2 sent" in first.stderr

    again = replay(kafka_bootstrap, topics, *chosen)
    assert again.status == 0 and again.lines == [], again.stderr
    assert len(replayed(kafka_bootstrap, topics, inputs)) == 2
    # Other filters are another group: they start from the beginning.
    other = replay(kafka_bootstrap, topics, "--stage", "decode", "--dry-run")
    assert [line["event_id"] for line in other.lines] == ["e3"]


def test_a_dead_letter_without_its_value_or_key_gets_them_back_from_the_input(kafka_bootstrap, topics):
    big = b'{"id": "big", "image": {"base64": "' + b"A" * 5000 + b'"}}'
    inputs = produce_inputs(
        kafka_bootstrap,
        topics.input,
        [
            (b"k-value", big, 0, None),
            (b"k" * 300, big + b" ", 0, None),
            (b"k-gone", big + b"  ", 1, None),
            (b"k-gone-count", b'{"id": "gone-count"}', 1, None),
        ],
    )
    kept_value, kept_both, gone_value, gone_count = inputs
    dead_letter(kafka_bootstrap, topics, kept_value, event_id="value", omit_value=True)
    dead_letter(kafka_bootstrap, topics, kept_both, event_id="both", omit_value=True, hash_key=True)
    dead_letter(kafka_bootstrap, topics, gone_value, event_id="gone-value", omit_value=True)
    dead_letter(kafka_bootstrap, topics, gone_count, event_id="gone-count")
    # The input topic's retention takes partition 1's records.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    [deleted] = admin.delete_records([TopicPartition(topics.input, 1, gone_count.offset + 1)]).values()
    deleted.result(30)

    run = replay(kafka_bootstrap, topics)
    assert run.status == 0, run.stderr
    lines = run.by_event
    assert {event: line["action"] for event, line in lines.items()} == {
        "value": "sent",
        "both": "sent",
        "gone-value": "unavailable",
        "gone-count": "sent",
    }
    assert "no longer retained" in lines["gone-value"]["note"]
    assert "replay.count unknown, counted as 0" in lines["gone-count"]["note"]
    sent = {record.key(): record for record in replayed(kafka_bootstrap, topics, inputs)}
    assert sent[kept_value.key].value() == kept_value.value
    assert sent[kept_both.key].value() == kept_both.value  # the original key, not its hash
    assert sent[gone_count.key].value() == gone_count.value and count_of(sent[gone_count.key]) == "1"
    assert set(sent) == {kept_value.key, kept_both.key, gone_count.key}


def test_a_record_at_the_maximum_count_is_refused(kafka_bootstrap, topics):
    inputs = produce_inputs(
        kafka_bootstrap,
        topics.input,
        [
            (b"third", b'{"id": "third"}', 0, [("replay.count", b"3")]),  # sent back three times already
            (b"second", b'{"id": "second"}', 0, [("replay.count", b"2")]),
            (b"fresh", b'{"id": "fresh"}', 0, None),
        ],
    )
    third, second, fresh = inputs
    dead_letter(kafka_bootstrap, topics, third, event_id="third")  # the service's dead letters carry no count today
    dead_letter(kafka_bootstrap, topics, second, event_id="second")
    dead_letter(
        kafka_bootstrap, topics, fresh, event_id="copied", replay_count="3"
    )  # a count the dead letter carries wins

    run = replay(kafka_bootstrap, topics)
    assert run.status == 0, run.stderr
    lines = run.by_event
    assert {event: line["action"] for event, line in lines.items()} == {
        "third": "refused",
        "second": "sent",
        "copied": "refused",
    }
    assert "--max-replays 3" in lines["third"]["note"]
    sent = {record.key(): count_of(record) for record in replayed(kafka_bootstrap, topics, inputs)}
    assert sent == {b"second": "3"}
    # A higher maximum lets the refused ones through, in a group of their own (--group).
    more = replay(kafka_bootstrap, topics, "--max-replays", "5", "--group", f"{topics.group}-more", "--dry-run")
    assert {event: line["action"] for event, line in more.by_event.items()} == {
        "third": "would_send",
        "second": "would_send",
        "copied": "would_send",
    }


def test_time_and_event_id_filters(kafka_bootstrap, topics):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    inputs = produce_inputs(
        kafka_bootstrap, topics.input, [(name.encode(), f'{{"id": "{name}"}}'.encode(), 0, None) for name in "abcd"]
    )
    for hours, source in zip((-1, 1, 2, 3), inputs, strict=True):
        dead_letter(
            kafka_bootstrap, topics, source, event_id=source.key.decode(), timestamp=start + timedelta(hours=hours)
        )

    chosen = ["--since", "2026-01-01T00:00Z", "--until", "2026-01-01T02:30", "--event-id", "a", "--event-id", "b"]
    run = replay(kafka_bootstrap, topics, *chosen, "--event-id", "d")
    assert run.status == 0, run.stderr
    # a: before --since; c: another id; d: after --until.
    assert [line["event_id"] for line in run.lines] == ["b"]
    assert [record.key() for record in replayed(kafka_bootstrap, topics, inputs)] == [b"b"]


def test_a_record_that_cannot_be_sent_stops_the_run_with_progress_kept_before_it(kafka_bootstrap, topics):
    inputs = produce_inputs(
        kafka_bootstrap,
        topics.input,
        [
            (b"small", b'{"id": "small"}', 0, None),
            (b"large", b"L" * 5000, 0, None),
            (b"after", b'{"id": "after"}', 0, None),
        ],
    )
    for source in inputs:
        dead_letter(kafka_bootstrap, topics, source, event_id=source.key.decode())

    refused = replay(kafka_bootstrap, topics, KAFKA_MESSAGE_MAX_BYTES="2000")
    assert refused.status == 3, refused.stderr
    assert refused.by_event["large"]["action"] == "failed" and "too large" in refused.by_event["large"]["note"].lower()
    assert "could not be sent" in refused.stderr.splitlines()[-1]

    retried = replay(kafka_bootstrap, topics)
    assert retried.status == 0, retried.stderr
    # Committed up to the failed one: it and what followed it in its batch are sent now (at least once).
    assert [line["event_id"] for line in retried.lines] == ["large", "after"]
    keys = [record.key() for record in replayed(kafka_bootstrap, topics, inputs)]
    assert sorted(keys) == [b"after", b"after", b"large", b"small"]


def test_it_says_why_when_the_broker_or_a_topic_cannot_be_read(kafka_bootstrap, topics):
    missing = replay(kafka_bootstrap, topics, DLQ_TOPIC=f"{topics.dlq}-missing")
    assert missing.status == 1
    assert f"topic {topics.dlq}-missing cannot be read" in missing.stderr.splitlines()[-1]

    unreachable = replay("127.0.0.1:1", topics)
    assert unreachable.status == 1
    assert "cannot reach the Kafka brokers at 127.0.0.1:1" in unreachable.stderr.splitlines()[-1]
