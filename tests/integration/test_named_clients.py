"""Each replica's clients are named after the service, its group and the replica, as Kafka's own
kafka-consumer-groups tool shows them to an operator."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from devtools.local_kafka import kafka_tool
from tests.support import ServiceRunner

pytestmark = pytest.mark.integration

CONSUMER_GROUPS = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"


def group_members(bootstrap: str, group: str) -> list[dict[str, str]]:
    """`kafka-consumer-groups.sh --describe --members`: one row per member, by column name (the columns
    are aligned, and GROUP-INSTANCE-ID is blank for a member without static membership)."""
    arguments = ["--bootstrap-server", bootstrap, "--describe", "--members", "--group", group]
    described = kafka_tool(CONSUMER_GROUPS, *arguments)
    assert described.returncode == 0, described.stdout + described.stderr
    lines = [line for line in described.stdout.splitlines() if line.strip()]
    header = next(index for index, line in enumerate(lines) if "CLIENT-ID" in line)
    starts = [match.start() for match in re.finditer(r"\S+", lines[header])]
    names = lines[header].split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [
        {name: line[start:end].strip() for name, (start, end) in zip(names, bounds, strict=True)}
        for line in lines[header + 1 :]
    ]


def test_the_group_shows_each_replicas_client_id(kafka_bootstrap, topics, tmp_path):
    replicas = {
        "static": {"KAFKA_GROUP_INSTANCE_ID": "replica-a"},
        "derived": {},
        "configured": {"KAFKA_CLIENT_ID": "ocr-team-diagrams"},
    }
    runners = {
        name: ServiceRunner(kafka_bootstrap, topics, Path("no-model"), tmp_path / name, {"ENGINE": "echo", **env})
        for name, env in replicas.items()
    }
    try:
        for runner in runners.values():
            runner.start(wait_ready=False)
        for runner in runners.values():
            runner.wait_ready()
        expected = {
            f"diagram-consumer-{topics.group}-replica-a",
            f"diagram-consumer-{topics.group}-{socket.gethostname()}-{runners['derived'].process.pid}",
            "ocr-team-diagrams",
        }
        members = group_members(kafka_bootstrap, topics.group)
        assert {member["CLIENT-ID"] for member in members} == expected, members
    finally:
        for runner in runners.values():
            runner.stop()
