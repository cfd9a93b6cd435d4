"""Shared fixtures: a real Kafka broker, the tiny model, and the service as a real subprocess.

The broker is, in order: KAFKA_BOOTSTRAP_SERVERS if set; testcontainers' Kafka if a Docker engine
answers; otherwise a single-node KRaft broker from Apache Kafka's own jars (devtools.local_kafka).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import ServiceRunner, create_test_topics


def pytest_report_header() -> str:
    from consumer.engine.device import cpu_flavour, dtype_name, resolve_dtype

    capped = {name: os.environ[name] for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if name in os.environ}
    return f"cpu flavour: {cpu_flavour()} (TORCH_DTYPE=auto: {dtype_name(resolve_dtype('auto', 'cpu'))})" + (
        f", imitated with {capped}" if capped else ""
    )


def _docker_kafka():
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - no engine: fall through to the local broker
        return None
    from testcontainers.kafka import KafkaContainer

    return KafkaContainer().with_kraft()


@pytest.fixture(scope="session")
def kafka_bootstrap():
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    container = _docker_kafka()
    if container is not None:
        with container:
            yield container.get_bootstrap_server()
        return
    from devtools.local_kafka import LocalKafka

    with LocalKafka() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL checkpoint (seed 0); its adapter is in <dir>/adapter."""
    from devtools.tiny import make_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(directory, seed=0)
    return directory


@pytest.fixture
def topics(kafka_bootstrap, request):
    return create_test_topics(kafka_bootstrap, request.node.name)


@pytest.fixture
def service(kafka_bootstrap, topics, tiny_model, tmp_path):
    """Start `python -m consumer run` with overrides: `service(IMAGE_ROOT=..., ...)`."""
    runners: list[ServiceRunner] = []

    def start(**env: str) -> ServiceRunner:
        runner = ServiceRunner(kafka_bootstrap, topics, tiny_model, tmp_path / f"service-{len(runners)}", env)
        runners.append(runner)
        runner.start()
        return runner

    yield start
    for runner in runners:
        runner.stop()
