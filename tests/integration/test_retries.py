"""Retries that hold no slot (RETRY_DELAYS, issue 18) on the real broker: `python -m consumer run`
with ENGINE=echo, fetching its images from a real HTTP server on loopback that answers 503 to the first
requests of a path (tests/hostile_http.py, `/flaky/<name>`). The delays are seconds, so each test takes
seconds. The unit tests of the same rules: tests/unit/stages/test_retry.py, test_records.py,
test_intake.py, and the property in tests/unit/test_one_record.py."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from tests.fakes import png_base64
from tests.hostile_http import HostileServer
from tests.support import (
    ServiceRunner,
    Topics,
    committed_equals_end,
    committed_offsets,
    produce,
    read_records,
    read_to_end,
)

pytestmark = pytest.mark.integration

PNG = base64.b64decode(png_base64(7, size=(64, 48)))


@pytest.fixture
def image_host():
    with HostileServer() as server:
        server.files["diagram"] = PNG
        yield server


@pytest.fixture
def echo_service(kafka_bootstrap, topics, tmp_path):
    runners: list[ServiceRunner] = []

    def start(**env: str) -> ServiceRunner:
        env = {"ENGINE": "echo", "IMAGE_ALLOWED_HOSTS": "127.0.0.1", "BATCH_MAX_WAIT_MS": "10", **env}
        runner = ServiceRunner(kafka_bootstrap, topics, Path("no-model"), tmp_path / f"s{len(runners)}", env)
        runners.append(runner)
        return runner.start()

    yield start
    for runner in runners:
        runner.stop()


def event(event_id: str, url: str | None = None) -> str:
    image = {"url": url} if url else {"base64": png_base64(3)}
    return json.dumps({"id": event_id, "image": image})


def headers_of(message) -> dict[str, str]:
    return {name: (value or b"").decode() for name, value in message.headers() or []}


def all_committed(bootstrap: str, topics: Topics, runner: ServiceRunner, *retry_topics: str) -> None:
    """The input topic committed to its end, and each retry topic past its last record (written in
    transactions, a retry topic's end is one past the last record: the commit marker, which no consumer
    ever reads, comes after it)."""
    done, committed, ends = committed_equals_end(bootstrap, topics.group, topics.input, timeout=60)
    assert done, f"{topics.input}: committed {committed} != ends {ends}\n{runner.log()}"
    for name in retry_topics:
        past_last: dict[int, int] = {}
        for record in read_to_end(bootstrap, name, isolation="read_committed"):
            past_last[record.partition()] = max(past_last.get(record.partition(), 0), record.offset() + 1)
        deadline = time.monotonic() + 60
        while True:
            committed = {p: offset for p, offset in committed_offsets(bootstrap, topics.group, name).items() if offset}
            if committed == past_last:
                break
            assert time.monotonic() < deadline, f"{name}: committed {committed} != {past_last}\n{runner.log()}"
            time.sleep(0.5)


def requests_for(server: HostileServer, path: str) -> list[float]:
    return [at for requested, at in server.times if requested == path]


def partition_count(bootstrap: str, topic: str) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    try:
        return len(probe.list_topics(topic, timeout=10).topics[topic].partitions)
    finally:
        probe.close()


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_host_that_fails_twice_then_answers_gets_the_result_after_the_hops(
    kafka_bootstrap, topics, echo_service, image_host, guarantee
):
    image_host.failures["diagram"] = 2
    runner = echo_service(PROCESSING_GUARANTEE=guarantee, RETRY_DELAYS="1s,2s")
    retry_topics = [f"{topics.input}-retry-1s", f"{topics.input}-retry-2s"]
    produce(kafka_bootstrap, topics.input, [("k-flaky", event("flaky", image_host.url("/flaky/diagram")))], 1)

    [result] = read_records(kafka_bootstrap, topics.output, 1, timeout=60, isolation="read_committed")
    all_committed(kafka_bootstrap, topics, runner, *retry_topics)
    described = json.loads(result.value())
    assert described["id"] == "flaky" and result.key() == b"k-flaky"
    assert described["metadata"]["source"] == {"topic": topics.input, "partition": 1, "offset": 0}
    assert read_to_end(kafka_bootstrap, topics.dlq, isolation="read_committed") == []
    assert len(read_to_end(kafka_bootstrap, topics.output, isolation="read_committed")) == 1

    # One hop per retry topic, each carrying the event and where it stands; created by the service
    # with the input topic's partition count.
    hops = [read_to_end(kafka_bootstrap, topic, isolation="read_committed") for topic in retry_topics]
    assert [len(records) for records in hops] == [1, 1]
    first, second = (headers_of(records[0]) for records in hops)
    assert (first["retry.attempt"], second["retry.attempt"]) == ("2", "3")
    assert first["retry.origin"] == second["retry.origin"] == f"{topics.input}/1/0"
    assert first["retry.first_error"].startswith("fetch/http_503: ") and len(json.loads(second["retry.errors"])) == 2
    assert hops[0][0].value() == hops[1][0].value() == event("flaky", image_host.url("/flaky/diagram")).encode()
    assert [partition_count(kafka_bootstrap, topic) for topic in retry_topics] == [3, 3]

    # Each attempt waited out its delay.
    attempts = requests_for(image_host, "/flaky/diagram")
    assert len(attempts) == 3
    assert attempts[1] - attempts[0] >= 1.0 - 0.05 and attempts[2] - attempts[1] >= 2.0 - 0.05, attempts


def test_a_host_that_never_answers_ends_in_one_dead_letter_listing_every_attempt(
    kafka_bootstrap, topics, echo_service, image_host
):
    image_host.failures["diagram"] = 1000
    runner = echo_service(RETRY_DELAYS="1s,2s")
    value = event("down", image_host.url("/flaky/diagram"))
    produce(kafka_bootstrap, topics.input, [("k-down", value)], partition=2)

    [dead] = read_records(kafka_bootstrap, topics.dlq, 1, timeout=60)
    all_committed(kafka_bootstrap, topics, runner, f"{topics.input}-retry-1s", f"{topics.input}-retry-2s")
    assert len(read_to_end(kafka_bootstrap, topics.dlq)) == 1
    assert read_to_end(kafka_bootstrap, topics.output) == []
    headers = headers_of(dead)
    assert (dead.key(), dead.value()) == (b"k-down", value.encode())
    assert (headers["error.stage"], headers["error.reason"], headers["error.attempts"]) == ("fetch", "http_503", "3")
    history = json.loads(headers["error.history"])
    assert len(history) == 3 and all(entry.startswith("fetch/http_503: ") for entry in history)
    # replay sends it back to the input topic, where it came from
    assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == (topics.input, "2", "0")
    assert headers["event.id"] == "down" and not any(name.startswith("retry.") for name in headers)
    assert len(requests_for(image_host, "/flaky/diagram")) == 3


def test_other_partitions_keep_flowing_while_a_record_waits(kafka_bootstrap, topics, echo_service, image_host):
    image_host.failures["diagram"] = 1
    runner = echo_service(RETRY_DELAYS="12s", MAX_IN_FLIGHT="4")
    retry_topic = f"{topics.input}-retry-12s"
    produce(kafka_bootstrap, topics.input, [("k-late", event("late", image_host.url("/flaky/diagram")))], 0)
    [hop] = read_records(kafka_bootstrap, retry_topic, 1, timeout=60)
    due_ms = int(headers_of(hop)["retry.due"])
    waiting = f"{retry_topic}[{hop.partition()}]"
    deadline = time.monotonic() + 10
    while waiting not in runner.health()[1]["waiting_partitions"]:
        assert time.monotonic() < deadline, f"{waiting} never reported waiting\n{runner.log()}"
        time.sleep(0.2)

    # Meanwhile: events on every input partition, the waiting one's included, more than MAX_IN_FLIGHT.
    for partition in range(3):
        produce(
            kafka_bootstrap,
            topics.input,
            [(f"k-{partition}-{n}", event(f"e-{partition}-{n}")) for n in range(3)],
            partition,
        )
    results = {json.loads(r.value())["id"]: r for r in read_records(kafka_bootstrap, topics.output, 10, timeout=60)}
    assert sorted(results) == sorted(["late", *(f"e-{p}-{n}" for p in range(3) for n in range(3))])
    published_ms = {event_id: result.timestamp()[1] for event_id, result in results.items()}
    late = published_ms.pop("late")
    assert max(published_ms.values()) < due_ms <= late, f"the others waited for the retry\n{runner.log()}"
    all_committed(kafka_bootstrap, topics, runner, retry_topic)
    assert runner.health()[1]["waiting_partitions"] == []
