"""A real single-node Apache Kafka broker (KRaft) from Apache's own jars, for the demo and tests.

There is no Docker engine everywhere this runs, so the broker's jars come from Maven Central
(deploy/kafka/pom.xml) and the broker runs under `java` on free loopback ports. The jars are fetched
once into .kafka/libs (LOCAL_KAFKA_LIBS_DIR overrides); Maven's own cache (~/.m2) makes later fetches free.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO_ROOT / "deploy" / "kafka"


def default_libs_dir() -> Path:
    return Path(os.environ.get("LOCAL_KAFKA_LIBS_DIR", REPO_ROOT / ".kafka" / "libs"))


def default_tools_dir() -> Path:
    return Path(os.environ.get("LOCAL_KAFKA_TOOLS_DIR", REPO_ROOT / ".kafka" / "tools"))


def ensure_jars(libs_dir: Path | None = None) -> Path:
    """Fetch the broker's jars with Maven unless they are already there."""
    return _fetch_jars(DEPLOY_DIR / "pom.xml", libs_dir or default_libs_dir(), "Apache Kafka jars")


def ensure_tool_jars(tools_dir: Path | None = None) -> Path:
    """Fetch Apache Kafka's command-line tools (deploy/kafka/tools-pom.xml) unless they are already there."""
    return _fetch_jars(DEPLOY_DIR / "tools-pom.xml", tools_dir or default_tools_dir(), "Apache Kafka's tools")


def _fetch_jars(pom: Path, directory: Path, what: str) -> Path:
    marker = directory / ".complete"
    if marker.exists():
        return directory
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise RuntimeError("the local Kafka broker and its tools need java (17+) and mvn on PATH")
    logger.info("fetching %s with Maven into %s (once)", what, directory)
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={directory.resolve()}",
        ],
        check=True,
    )
    marker.touch()
    return directory


def kafka_tool(main_class: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run one of Apache Kafka's command-line tools by the class behind its bin/kafka-*.sh script, e.g.
    `org.apache.kafka.tools.consumer.group.ConsumerGroupCommand` for kafka-consumer-groups.sh."""
    tools = ensure_tool_jars()
    return subprocess.run(
        [
            "java",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            f"{tools}/*",
            main_class,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalKafka:
    """One combined broker+controller node on loopback; a context manager that cleans up after itself."""

    def __init__(self, workdir: Path | None = None, port: int | None = None, heap_mb: int = 512) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="local-kafka-"))
        self.port = port or free_port()
        self.controller_port = free_port()
        self.heap_mb = heap_mb
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, libs: Path, *args: str) -> list[str]:
        return [
            "java",
            f"-Xms{self.heap_mb}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-cp",
            f"{libs}/*",
            f"-Dlog4j2.configurationFile={DEPLOY_DIR / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.workdir / 'logs'}",
            *args,
        ]

    def start(self, timeout: float = 90.0) -> LocalKafka:
        """Start the broker and wait until it answers; a no-op if this instance already runs one."""
        if self.process is not None and self.process.poll() is None:
            return self
        libs = ensure_jars()
        self.workdir.mkdir(parents=True, exist_ok=True)
        properties = self.workdir / "server.properties"
        properties.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "log.cleaner.dedupe.buffer.size=33554432",
                ]
            )
            + "\n"
        )
        data_dir = self.workdir / "data"
        if not (data_dir / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run(
                self._java(
                    libs,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(properties),
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        log = open(self.workdir / "broker.out", "ab")
        self.process = subprocess.Popen(
            self._java(libs, "kafka.Kafka", str(properties)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready(timeout)
        logger.info("local Kafka broker ready at %s (data in %s)", self.bootstrap_servers, self.workdir)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while not self._port_open():  # wait quietly: librdkafka logs every refused connection
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"Kafka broker exited early; see {self.workdir / 'broker.out'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka broker not listening after {timeout} s; see {self.workdir / 'broker.out'}")
            time.sleep(0.2)
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"Kafka broker exited early; see {self.workdir / 'broker.out'}")
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        raise RuntimeError(f"Kafka broker not ready after {timeout} s; see {self.workdir / 'broker.out'}")

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_topics(bootstrap_servers: str, topics: dict[str, int], timeout: float = 30.0) -> None:
    """Create topics with the given partition counts (replication 1); existing ones are left alone."""
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=count, replication_factor=1) for name, count in topics.items()],
        request_timeout=timeout,
    )
    for _name, future in futures.items():
        try:
            future.result(timeout)
        except Exception as exc:  # noqa: BLE001
            error = exc.args[0] if exc.args else None
            if getattr(error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
