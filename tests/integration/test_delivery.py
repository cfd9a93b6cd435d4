"""Delivery guarantees against a real broker: slow model, crashed members, broker restart, SIGTERM,
poison events. The service runs as real subprocesses; ENGINE=echo with ECHO_DELAY_MS stands in for
a model of known speed (it sleeps per batch), except in the poison test, which runs the tiny model.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from PIL import Image

from consumer.errors import ExitCode
from devtools.samples import png_bytes, sample_diagram
from tests.support import (
    ServiceRunner,
    Topics,
    committed_equals_end,
    committed_offsets,
    create_test_topics,
    http_get,
    produce,
    read_to_end,
)

pytestmark = pytest.mark.integration

SMALL_PNG = png_bytes(sample_diagram(0, (320, 240)))


def event(event_id: str, image: bytes = SMALL_PNG) -> tuple[str, str]:
    return event_id, json.dumps({"id": event_id, "image": {"base64": base64.b64encode(image).decode()}})


def wait_for(condition, timeout: float, what: str, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log}")
        time.sleep(0.2)


class ResultWatcher:
    """Reads the output topic in the background and counts results per id."""

    def __init__(self, bootstrap: str, topic: str, isolation: str = "read_uncommitted") -> None:
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"watcher-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": isolation,
            }
        )
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.2)
            if message is not None and not message.error():
                self.counts[json.loads(message.value())["id"]] += 1
        self._consumer.close()

    @property
    def unique(self) -> int:
        return len(self.counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def echo_service(tmp_path):
    """`echo_service(bootstrap, topics, **env)`: an unstarted ENGINE=echo service; stopped at teardown."""
    runners: list[ServiceRunner] = []

    def make(bootstrap: str, topics: Topics, **env: str) -> ServiceRunner:
        env = {"ENGINE": "echo", "LOG_LEVEL": "INFO", **env}
        runner = ServiceRunner(bootstrap, topics, Path("no-model"), tmp_path / f"service-{len(runners)}", env)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.stop()


def ids_in(records) -> Counter[str]:
    return Counter(json.loads(record.value())["id"] for record in records)


# -- a model slower than max.poll.interval.ms ---------------------------------------------------------
def test_a_batch_longer_than_max_poll_interval_costs_no_rebalance(kafka_bootstrap, topics, echo_service):
    ids = [f"slow-{index}" for index in range(4)]
    produce(kafka_bootstrap, topics.input, [event(event_id) for event_id in ids])
    runner = echo_service(
        kafka_bootstrap,
        topics,
        ECHO_DELAY_MS="8000",
        BATCH_SIZE="4",
        BATCH_MAX_WAIT_MS="1000",
        KAFKA_MAX_POLL_INTERVAL_MS="6000",
        KAFKA_SESSION_TIMEOUT_MS="6000",
        KAFKA_HEARTBEAT_INTERVAL_MS="1000",
    ).start()

    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input, timeout=60)
    assert settled, f"committed {committed} != end offsets {ends}\n{runner.log()}"
    log = runner.full_log()
    assert "generating a batch of" in log
    assert "revoked [" not in log and "partitions lost" not in log and "maximum poll interval" not in log, log
    assert log.count("assigned [") == 1, log  # one assignment: the group never rebalanced

    runner.signal()
    assert runner.wait(30) == 0, runner.log()
    assert ids_in(read_to_end(kafka_bootstrap, topics.output)) == Counter(ids)  # each exactly once


# -- members killed with SIGKILL in the middle of a run -----------------------------------------------
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_members_killed_mid_run_lose_nothing(kafka_bootstrap, echo_service, request, guarantee):
    exactly_once = guarantee == "exactly_once"
    topics = create_test_topics(kafka_bootstrap, request.node.name, partitions=6)
    # The exactly-once run also freezes a zombie after the kills: more events keep work in flight.
    ids = [f"crash-{index}" for index in range(600 if exactly_once else 300)]
    produce(kafka_bootstrap, topics.input, [event(event_id) for event_id in ids])
    isolation = "read_committed" if exactly_once else "read_uncommitted"
    env = {
        "PROCESSING_GUARANTEE": guarantee,
        "ECHO_DELAY_MS": "200",
        "BATCH_SIZE": "4",
        "MAX_IN_FLIGHT": "8",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    }

    def member(slot: int) -> ServiceRunner:
        # A replacement takes its slot's transactional.id, as a restarted pod would: it fences the
        # killed process and aborts its open transaction at once.
        return echo_service(kafka_bootstrap, topics, TRANSACTIONAL_ID=f"{topics.group}-{slot}", **env).start(
            wait_ready=False
        )

    # Two members first; the third joins while they are busy, so each gives up partitions mid-batch.
    members = {slot: member(slot) for slot in range(2)}
    for runner in members.values():
        runner.wait_ready()
    watcher = ResultWatcher(kafka_bootstrap, topics.output, isolation)
    chooser = random.Random()
    killed, zombie = [], None
    try:
        wait_for(lambda: watcher.unique >= 20, 60, "the first results")
        members[2] = member(2).wait_ready()
        for threshold in (80, 160):
            wait_for(lambda threshold=threshold: watcher.unique >= threshold, 60, f"{threshold} results")
            slot = chooser.choice(sorted(members))
            members[slot].signal(signal.SIGKILL)
            members[slot].wait(10)
            killed.append((slot, watcher.unique))
            members[slot] = member(slot)
        if exactly_once:
            zombie = freeze_a_zombie(members, chooser, watcher)
        wait_for(
            lambda: watcher.unique == len(ids),
            90,
            "every id's result",
            "\n".join(runner.log()[-1500:] for runner in members.values()),
        )
    finally:
        watcher.close()
    for runner in members.values():
        runner.wait_ready()
        runner.signal()
    for runner in members.values():
        assert runner.wait(30) == 0, runner.log()

    counts = ids_in(read_to_end(kafka_bootstrap, topics.output, isolation))
    duplicates = sum(counts.values()) - len(counts)
    print(
        f"\n{guarantee}: {len(ids)} events, killed (slot, results so far) {killed}: {len(counts)} ids with a "
        f"result, {duplicates} duplicate results ({isolation} reader)"
    )
    assert set(counts) == set(ids)  # nothing lost
    if exactly_once:
        assert duplicates == 0, counts.most_common(5)
        zombie_log = zombie.full_log()
        assert "partitions lost" in zombie_log, zombie.log()  # it really was fenced out of the group
        print(f"the zombie aborted {zombie_log.count('aborting the transaction')} transaction(s) after thawing")
    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input)
    assert settled, f"committed {committed} != end offsets {ends}"


def freeze_a_zombie(members: dict[int, ServiceRunner], chooser: random.Random, watcher: ResultWatcher) -> ServiceRunner:
    """Freeze a member past its session timeout while it works, then thaw it: the group has moved
    on without it, and the broker must refuse the offsets of any transaction it still commits."""
    for runner in members.values():
        runner.wait_ready()  # the group is stable: no rebalance in progress to keep the zombie in
    before = watcher.unique
    wait_for(lambda: watcher.unique >= before + 10, 60, "work in flight")
    zombie = members[chooser.choice(sorted(members))]
    zombie.signal(signal.SIGSTOP)
    time.sleep(9)  # > KAFKA_SESSION_TIMEOUT_MS
    zombie.signal(signal.SIGCONT)
    return zombie


# -- the broker restarts in the middle of a run --------------------------------------------------------
@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which it may stop and start again (same ports, same data)."""
    if shutil.which("java") is None:
        pytest.skip("the broker-restart test runs its own local broker, which needs java")
    from devtools.local_kafka import LocalKafka

    broker = LocalKafka(workdir=tmp_path / "kafka").start()
    yield broker
    broker.stop()


def test_broker_restart_loses_nothing_and_the_service_recovers(own_broker, echo_service, request):
    bootstrap = own_broker.bootstrap_servers
    topics = create_test_topics(bootstrap, request.node.name)
    before = [f"before-{index}" for index in range(40)]
    after = [f"after-{index}" for index in range(40)]
    produce(bootstrap, topics.input, [event(event_id) for event_id in before])
    runner = echo_service(bootstrap, topics, ECHO_DELAY_MS="100", BATCH_SIZE="4", MAX_IN_FLIGHT="8").start()
    watcher = ResultWatcher(bootstrap, topics.output)
    try:
        wait_for(lambda: watcher.unique >= 8, 60, "the first results", runner.log())
        own_broker.stop()
        wait_for(
            lambda: runner.health()[0] == 503 and not runner.health()[1]["broker_ok"],
            30,
            "/health to report the broker unreachable",
            runner.log(),
        )
        # Commits and produce retries wait on the broker, never the poll loop: it keeps coming round.
        for _ in range(6):
            status, live = http_get(runner.url + "/health/live")
            assert status == 200 and json.loads(live)["last_poll_age_seconds"] < 5, live
            time.sleep(0.5)
        own_broker.start()
        produce(bootstrap, topics.input, [event(event_id) for event_id in after])
        wait_for(lambda: watcher.unique == len(before) + len(after), 120, "every id's result", runner.log())
    finally:
        watcher.close()
    wait_for(lambda: runner.health()[0] == 200, 30, "/health ready again", runner.log())
    assert runner.process.poll() is None  # the same process throughout: it recovered by itself
    settled, committed, ends = committed_equals_end(bootstrap, topics.group, topics.input)
    assert settled, f"committed {committed} != end offsets {ends}\n{runner.log()}"
    assert set(ids_in(read_to_end(bootstrap, topics.output))) == set(before + after)
    runner.signal()
    assert runner.wait(30) == 0, runner.log()


# -- SIGTERM while the broker has stopped answering ----------------------------------------------------
def generating_a_batch(
    echo_service, bootstrap: str, topics: Topics, prefix: str, shutdown_timeout: int, delay_ms: int, guarantee: str = ""
) -> tuple[ServiceRunner, list[str]]:
    """Eight events on one partition and an echo service generating its first batch of four (`delay_ms` each)."""
    ids = [f"{prefix}-{index}" for index in range(8)]
    produce(bootstrap, topics.input, [event(event_id) for event_id in ids])
    env = {"PROCESSING_GUARANTEE": guarantee} if guarantee else {}
    runner = echo_service(
        bootstrap,
        topics,
        ECHO_DELAY_MS=str(delay_ms),
        BATCH_SIZE="4",
        BATCH_MAX_WAIT_MS="500",
        SHUTDOWN_TIMEOUT=str(shutdown_timeout),
        **env,
    ).start()
    wait_for(lambda: "generating a batch of" in runner.full_log(), 30, "a batch to start", runner.log())
    return runner, ids


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_sigterm_with_the_broker_frozen_exits_by_the_shutdown_timeout(own_broker, echo_service, request, guarantee):
    """An orchestrator's grace period is sized to SHUTDOWN_TIMEOUT: a replica whose broker stopped answering
    (frozen, not refusing connections) leaves by then, saying its work is unfinished, and a successor finds
    every event once the broker is back."""
    bootstrap = own_broker.bootstrap_servers
    topics = create_test_topics(bootstrap, request.node.name, partitions=1)
    shutdown_timeout = 10
    runner, ids = generating_a_batch(echo_service, bootstrap, topics, "frozen", shutdown_timeout, 2000, guarantee)
    own_broker.process.send_signal(signal.SIGSTOP)
    try:
        runner.signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            status = runner.wait(shutdown_timeout + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {shutdown_timeout + 60} s after SIGTERM:\n{runner.log()}")
        took = time.monotonic() - started
    finally:
        own_broker.process.send_signal(signal.SIGCONT)
    print(f"exited {status} after {took:.1f} s")
    assert status == ExitCode.UNFINISHED, runner.log()
    # Then leaving the group: librdkafka gives its LeaveGroup request 5 s, and the docs promise "a few seconds".
    assert took < shutdown_timeout + 8, runner.log()

    successor = echo_service(bootstrap, topics, PROCESSING_GUARANTEE=guarantee).start()
    settled, committed, ends = committed_equals_end(bootstrap, topics.group, topics.input, timeout=90)
    assert settled, f"committed {committed} != end offsets {ends}\n{successor.log()}"
    assert set(ids_in(read_to_end(bootstrap, topics.output))) == set(ids)  # nothing lost


# -- SIGTERM while a batch is generating -----------------------------------------------------------------
def test_sigterm_mid_batch_publishes_commits_and_exits_zero(kafka_bootstrap, echo_service, request):
    topics = create_test_topics(kafka_bootstrap, request.node.name, partitions=1)
    shutdown_timeout = 20
    runner, ids = generating_a_batch(echo_service, kafka_bootstrap, topics, "term", shutdown_timeout, 3000)
    runner.signal(signal.SIGTERM)
    assert runner.wait(shutdown_timeout) == 0, runner.log()

    batch_line = next(line for line in runner.full_log().splitlines() if "generating a batch of" in line)
    in_batch = set(re.findall(r"id=(term-\d+)", batch_line))
    published = ids_in(read_to_end(kafka_bootstrap, topics.output))
    assert in_batch and in_batch <= set(published)  # the batch in flight was finished and published
    # ...and committed: the committed offset is exactly past what was published, nothing more.
    assert committed_offsets(kafka_bootstrap, topics.group, topics.input) == {0: len(published)}
    assert set(published) == set(ids[: len(published)])

    # The events it had not started are not lost: the next replica starts where this one stopped.
    successor = echo_service(kafka_bootstrap, topics).start()
    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input, timeout=60)
    assert settled, f"committed {committed} != end offsets {ends}\n{successor.log()}"
    successor.signal()
    assert successor.wait(30) == 0, successor.log()
    assert ids_in(read_to_end(kafka_bootstrap, topics.output)) == Counter(ids)  # each exactly once


# -- a poison event ------------------------------------------------------------------------------------
def test_poison_event_does_not_stop_its_partition(kafka_bootstrap, topics, service):
    """The tiny model raises on a 6000x20 banner (Qwen's processor refuses aspect ratios over 200):
    the event is dead-lettered at `prepare` and the events after it on the same partition get their
    results. (A batch whose generate fails is retried one by one: tests/unit/stages/test_infer.py.)"""
    banner = io.BytesIO()
    Image.new("RGB", (6000, 20), "white").save(banner, "PNG")
    before, after = ["good-0", "good-1", "good-2"], ["good-3", "good-4", "good-5"]
    records = [event(i) for i in before] + [event("poison", banner.getvalue())] + [event(i) for i in after]
    produce(kafka_bootstrap, topics.input, records, partition=0)
    runner = service(BATCH_SIZE="4", BATCH_MAX_WAIT_MS="500")

    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input, timeout=120)
    assert settled, f"committed {committed} != end offsets {ends}\n{runner.log()}"
    results = read_to_end(kafka_bootstrap, topics.output)
    assert ids_in(results) == Counter(before + after), runner.log()
    poison_offset = len(before)
    source_offsets = {json.loads(record.value())["metadata"]["source"]["offset"] for record in results}
    assert set(range(poison_offset + 1, poison_offset + 1 + len(after))) <= source_offsets  # after the poison
    dead = read_to_end(kafka_bootstrap, topics.dlq)
    assert len(dead) == 1
    headers = {key: value.decode() for key, value in dead[0].headers()}
    assert headers["event.id"] == "poison" and headers["source.offset"] == str(poison_offset)
    assert headers["error.stage"] == "prepare" and headers["error.reason"] == "unexpected", headers
    runner.signal()
    assert runner.wait(60) == 0, runner.log()


# -- a result the broker refuses as too large takes no neighbour down --------------------------------
def limit_message_bytes(bootstrap: str, topic: str, limit: int) -> None:
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

    entry = ConfigEntry("max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.incremental_alter_configs(
        [ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])]
    ).values():
        future.result(30)


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_an_oversized_result_is_dead_lettered_alone_and_its_batch_is_published(
    kafka_bootstrap, echo_service, request, guarantee
):
    """One generate call, seven results; the broker refuses the one over the output topic's limit.

    at_least_once: only that record fails. exactly_once: it fails the transaction, which is aborted
    and redone with a dead letter in its place, never retried forever.
    """
    topics = create_test_topics(kafka_bootstrap, request.node.name, partitions=1)
    limit_message_bytes(kafka_bootstrap, topics.output, 3000)
    ids = [f"fits-{index}" for index in range(3)] + ["too-big"] + [f"fits-{index}" for index in range(3, 6)]
    records = [event(event_id) for event_id in ids]
    big = json.loads(records[3][1])
    big["metadata"] = {"blob": base64.b64encode(random.randbytes(6000)).decode()}  # copied into the result
    records[3] = ("too-big", json.dumps(big))
    produce(kafka_bootstrap, topics.input, records)
    runner = echo_service(
        kafka_bootstrap, topics, PROCESSING_GUARANTEE=guarantee, BATCH_SIZE="8", BATCH_MAX_WAIT_MS="2000"
    ).start()

    settled, committed, ends = committed_equals_end(kafka_bootstrap, topics.group, topics.input, timeout=60)
    assert settled, f"committed {committed} != end offsets {ends}\n{runner.log()}"
    runner.signal()
    assert runner.wait(30) == 0, runner.log()
    results = read_to_end(kafka_bootstrap, topics.output, "read_committed")
    assert ids_in(results) == Counter(event_id for event_id in ids if event_id != "too-big"), runner.log()
    assert {json.loads(r.value())["metadata"]["batch_size"] for r in results} == {7}  # all in one batch
    dead = read_to_end(kafka_bootstrap, topics.dlq, "read_committed")
    assert [message.key().decode() for message in dead] == ["too-big"]
    headers = {key: value.decode() for key, value in dead[0].headers()}
    assert (headers["error.stage"], headers["error.reason"]) == ("publish", "too_large")
    assert "producer batch.size=1976" in runner.full_log()
    if guarantee == "exactly_once":
        assert "aborting the transaction" in runner.full_log()
