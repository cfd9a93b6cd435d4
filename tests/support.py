"""Test helpers: topics, reading records back, offsets, and the service as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from devtools.local_kafka import create_topics, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str


def create_test_topics(bootstrap: str, name: str, partitions: int = 3) -> Topics:
    suffix = uuid.uuid4().hex[:8]
    stem = "".join(ch if ch.isalnum() else "-" for ch in name)[:40]
    topics = Topics(f"{stem}-in-{suffix}", f"{stem}-out-{suffix}", f"{stem}-dlq-{suffix}", f"{stem}-group-{suffix}")
    create_topics(bootstrap, {topics.input: partitions, topics.output: partitions, topics.dlq: 1})
    return topics


def produce(
    bootstrap: str, topic: str, records: list[tuple[str | None, bytes | str | None]], partition: int | None = None
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        if partition is None:
            producer.produce(topic, key=key, value=value)
        else:
            producer.produce(topic, key=key, value=value, partition=partition)
    assert producer.flush(30) == 0


def read_records(bootstrap: str, topic: str, count: int, timeout: float = 120.0, isolation: str = "read_uncommitted"):
    """Read `count` records from the start of `topic` (fewer if `timeout` passes)."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    reader.subscribe([topic])
    records = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = reader.poll(0.5)
            if message is not None and not message.error():
                records.append(message)
    finally:
        reader.close()
    return records


def read_to_end(bootstrap: str, topic: str, isolation: str = "read_uncommitted", timeout: float = 60.0) -> list:
    """Every record now in `topic`, read up to each partition's end (the last stable offset for
    read_committed). Call it once nothing writes to the topic any more."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
        }
    )
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, at_end = [], set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: only partitions {sorted(at_end)} of {len(partitions)} read to the end")
            message = reader.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                continue
            at_end.discard(message.partition())
            records.append(message)
        return records
    finally:
        reader.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (0 where nothing is committed)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
        committed = probe.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in committed}
    finally:
        probe.close()


def committed_equals_end(bootstrap: str, group: str, topic: str, timeout: float = 30.0) -> tuple[bool, dict, dict]:
    """Wait until the group's committed offsets equal the topic's end offsets on every partition."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = probe.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        deadline = time.monotonic() + timeout
        committed: dict = {}
        while True:
            ends = {tp.partition: probe.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
            try:
                committed = {tp.partition: max(tp.offset, 0) for tp in probe.committed(tps, timeout=10)}
            except KafkaException as exc:
                # Offsets sent in a transaction that is still open cannot be read until it ends
                # (the broker answers UNSTABLE_OFFSET_COMMIT and librdkafka waits): ask again.
                if exc.args[0].code() != KafkaError._TIMED_OUT:
                    raise
            if committed == ends or time.monotonic() > deadline:
                return committed == ends, committed, ends
            time.sleep(0.5)
    finally:
        probe.close()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class ServiceRunner:
    """`python -m consumer run` as a real subprocess, configured through its environment."""

    def __init__(self, bootstrap: str, topics: Topics, model_dir: Path, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "service.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")},
            "PYTHONUNBUFFERED": "1",
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_GROUP_ID": topics.group,
            "INPUT_TOPIC": topics.input,
            "OUTPUT_TOPIC": topics.output,
            "DLQ_TOPIC": topics.dlq,
            "BASE_MODEL_ID": str(model_dir),
            "ADAPTER_PATH": str(model_dir / "adapter"),
            "MAX_NEW_TOKENS": "8",
            "HTTP_PORT": str(self.port),
            "HTTP_HOST": "127.0.0.1",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 120.0, wait_ready: bool = True) -> ServiceRunner:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
        )
        return self.wait_ready(ready_timeout) if wait_ready else self

    def wait_ready(self, ready_timeout: float = 120.0) -> ServiceRunner:
        """Wait until /health answers 200; fail with the service's log if it exits or times out."""
        assert self.process is not None
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                status, _ = http_get(self.url + "/health", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"service not ready after {ready_timeout} s:\n{self.log()}")

    def health(self) -> tuple[int, dict]:
        status, body = http_get(self.url + "/health")
        return status, json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
