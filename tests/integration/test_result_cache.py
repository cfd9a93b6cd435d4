"""The result cache end to end: `python -m consumer run` (ENGINE=echo) on the real broker with
RESULT_CACHE_TOPIC. A repeated image is answered without generating, a restarted replica answers it
from the compacted topic, another prompt is a miss, and replicas of one group share their answers."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType

from consumer.events import DiagramResult
from tests.fakes import png_base64
from tests.support import ServiceRunner, Topics, http_get, produce, read_records

pytestmark = pytest.mark.integration


def metric(service: ServiceRunner, name: str) -> float:
    _, body = http_get(service.url + "/metrics")
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def generated(service: ServiceRunner) -> float:
    """Images this replica ran through the model: the sum of its batch sizes."""
    return metric(service, "diagram_batch_size_sum")


def event(event_id: str, image: str, prompt: str | None = None) -> str:
    return json.dumps({"id": event_id, "image": {"base64": image}, **({"prompt": prompt} if prompt else {})})


class Results:
    """The output topic, read as results arrive."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap, self.topic = bootstrap, topics.output

    def all(self, count: int) -> dict[str, DiagramResult]:
        records = read_records(self.bootstrap, self.topic, count, timeout=60)
        assert len(records) == count, f"{len(records)} of {count} results"
        results = [DiagramResult.model_validate_json(record.value()) for record in records]
        return {result.id: result for result in results}


def start(bootstrap: str, topics: Topics, workdir: Path, cache_topic: str, **env: str) -> ServiceRunner:
    return ServiceRunner(
        bootstrap,
        topics,
        Path("no-model"),
        workdir,
        {"ENGINE": "echo", "RESULT_CACHE_TOPIC": cache_topic, "BATCH_MAX_WAIT_MS": "20", **env},
    ).start()


def test_a_repeated_image_is_answered_from_the_cache_and_after_a_restart(kafka_bootstrap, topics, tmp_path):
    cache_topic = f"{topics.input}-cache"  # not created beforehand: the service creates it, compacted
    image, results = png_base64(11), Results(kafka_bootstrap, topics)
    service = start(kafka_bootstrap, topics, tmp_path / "first", cache_topic)
    try:
        produce(kafka_bootstrap, topics.input, [("a", event("first", image))])
        results.all(1)
        produce(kafka_bootstrap, topics.input, [("b", event("second", image))])
        results.all(2)
        produce(kafka_bootstrap, topics.input, [("c", event("other-prompt", image, prompt="List the roles only"))])
        answered = results.all(3)
        assert generated(service) == 2, "the second copy must not run the model"
        assert metric(service, "diagram_result_cache_hits_total") == 1
        assert metric(service, "diagram_result_cache_misses_total") == 2
        assert metric(service, "diagram_result_cache_entries") == 2
    finally:
        service.stop()
    first, second, other = answered["first"], answered["second"], answered["other-prompt"]
    assert (first.metadata.cache, second.metadata.cache, other.metadata.cache) == ("miss", "hit", "miss")
    assert second.description == first.description
    assert second.metadata.result_key == first.metadata.result_key != other.metadata.result_key
    assert first.metadata.content_hash == second.metadata.content_hash == other.metadata.content_hash

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, cache_topic)
    config = admin.describe_configs([resource])[resource].result(30)
    assert config["cleanup.policy"].value == "compact"

    # A new process reads the topic before it is ready, and answers a third copy from it.
    restarted = start(kafka_bootstrap, topics, tmp_path / "restarted", cache_topic)
    try:
        assert metric(restarted, "diagram_result_cache_entries") == 2, "loaded before reporting ready"
        produce(kafka_bootstrap, topics.input, [("d", event("third", image))])
        third = results.all(4)["third"]
        assert generated(restarted) == 0
    finally:
        restarted.stop()
    assert third.metadata.cache == "hit" and third.description == first.description
    assert third.metadata.result_key == first.metadata.result_key
    assert "read " + cache_topic + " to its end" in restarted.full_log()


def test_two_replicas_in_one_group_share_their_answers(kafka_bootstrap, topics, tmp_path):
    """Under exactly-once, so the entries the followers read are the committed ones."""
    cache_topic = f"{topics.input}-cache-{uuid.uuid4().hex[:6]}"
    image, results = png_base64(12), Results(kafka_bootstrap, topics)
    replicas = [
        start(kafka_bootstrap, topics, tmp_path / f"replica-{n}", cache_topic, PROCESSING_GUARANTEE="exactly_once")
        for n in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(replica.health()[1].get("assigned_partitions") for replica in replicas):
            assert time.monotonic() < deadline, "both replicas should own partitions"
            time.sleep(0.5)
        produce(kafka_bootstrap, topics.input, [("k", event("original", image))], partition=0)
        results.all(1)
        deadline = time.monotonic() + 30
        while not all(metric(replica, "diagram_result_cache_entries") == 1 for replica in replicas):
            assert time.monotonic() < deadline, "every replica should have read the entry"
            time.sleep(0.2)
        # A copy on every partition: whichever replica owns it answers from the shared cache.
        for partition in range(3):
            produce(kafka_bootstrap, topics.input, [("k", event(f"copy-{partition}", image))], partition=partition)
        answered = results.all(4)
        per_replica = [(generated(replica), metric(replica, "diagram_result_cache_hits_total")) for replica in replicas]
    finally:
        for replica in replicas:
            replica.stop()
    assert sum(count for count, _ in per_replica) == 1, f"one generation in all: {per_replica}"
    assert all(hits >= 1 for _, hits in per_replica), f"each replica answered a copy from the cache: {per_replica}"
    original = answered["original"]
    for partition in range(3):
        copy = answered[f"copy-{partition}"]
        assert copy.metadata.cache == "hit" and copy.description == original.description
