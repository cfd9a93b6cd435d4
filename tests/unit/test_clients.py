"""fit_to_topic_limits without a broker: the producer config is left as it was, and the service starts.
ensure_retry_topics against a scripted admin client: what it creates, and when the service must not start.

With a broker (the limit read and applied, an oversized result dead-lettered alone):
tests/integration/test_delivery.py; the retry topics created: tests/integration/test_retries.py.
"""

from __future__ import annotations

import logging
import time

from consumer.clients import fit_to_topic_limits


def test_unreadable_topic_limits_leave_the_producer_config_unchanged(caplog):
    config = {"bootstrap.servers": "127.0.0.1:9", "enable.idempotence": True, "linger.ms": 5}
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="consumer.clients"):
        assert fit_to_topic_limits(config, ["out", "dlq"], timeout=1.0) == config
    assert time.monotonic() - started < 5  # one bounded wait for both topics, not one each
    assert "cannot read max.message.bytes of out" in caplog.text
    assert "cannot read max.message.bytes of dlq" in caplog.text


def test_the_transactional_id_and_the_client_id_name_the_same_replica():
    from consumer.clients import producer_config, transactional_id
    from consumer.settings import Settings

    static = Settings.from_environ({"KAFKA_GROUP_ID": "g", "KAFKA_GROUP_INSTANCE_ID": "pod-0"})
    assert transactional_id(static) == "g-pod-0"
    derived = Settings.from_environ({"KAFKA_GROUP_ID": "g", "PROCESSING_GUARANTEE": "exactly_once"})
    config = producer_config(derived)
    assert config["transactional.id"] == f"g-{derived.replica_name()}"
    assert config["client.id"] == f"diagram-consumer-g-{derived.replica_name()}"
    assert transactional_id(Settings.from_environ({"TRANSACTIONAL_ID": "fixed"})) == "fixed"


def test_the_topic_limit_admin_client_carries_the_producers_client_id(monkeypatch):
    import confluent_kafka.admin

    seen: list[dict] = []

    class RecordingAdmin:
        def __init__(self, config: dict) -> None:
            seen.append(config)

        def describe_configs(self, resources, request_timeout):
            return {}

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", RecordingAdmin)
    fit_to_topic_limits({"bootstrap.servers": "127.0.0.1:9", "client.id": "diagram-consumer-g-pod-0"}, ["out"])
    assert seen[0]["client.id"] == "diagram-consumer-g-pod-0"


class ScriptedAdmin:
    """An AdminClient whose cluster holds `topics` (name -> partition count) and whose create_topics
    answers each topic with `refusal` (a KafkaError) or creates it."""

    topics: dict[str, int] = {}
    refusal = None
    created: list[tuple[str, int, int]] = []

    def __init__(self, config: dict) -> None:
        self.config = config

    def list_topics(self, timeout: float):
        from confluent_kafka.admin import PartitionMetadata, TopicMetadata

        metadata = type("ClusterMetadata", (), {})()
        metadata.topics = {}
        for name, count in ScriptedAdmin.topics.items():
            topic = TopicMetadata()
            topic.topic, topic.error = name, None
            partitions = {}
            for number in range(count):
                partition = PartitionMetadata()
                partition.id, partition.leader = number, 1
                partitions[number] = partition
            topic.partitions = partitions
            metadata.topics[name] = topic
        return metadata

    def create_topics(self, new_topics, request_timeout: float):
        from concurrent.futures import Future

        from confluent_kafka import KafkaException

        futures = {}
        for new in new_topics:
            future: Future = Future()
            if ScriptedAdmin.refusal is not None:
                future.set_exception(KafkaException(ScriptedAdmin.refusal))
            else:
                ScriptedAdmin.created.append((new.topic, new.num_partitions, new.replication_factor))
                ScriptedAdmin.topics[new.topic] = new.num_partitions
                future.set_result(None)
            futures[new.topic] = future
        return futures


def scripted(monkeypatch, topics: dict[str, int], refusal=None) -> type[ScriptedAdmin]:
    import confluent_kafka.admin

    monkeypatch.setattr(ScriptedAdmin, "topics", dict(topics))
    monkeypatch.setattr(ScriptedAdmin, "refusal", refusal)
    monkeypatch.setattr(ScriptedAdmin, "created", [])
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", ScriptedAdmin)
    return ScriptedAdmin


def test_missing_retry_topics_are_created_like_the_input_topic(monkeypatch, caplog):
    from consumer.clients import ensure_retry_topics
    from consumer.settings import Settings

    admin = scripted(monkeypatch, {"in": 6, "in-retry-60s": 3})
    settings = Settings.from_environ({"INPUT_TOPIC": "in", "RETRY_DELAYS": "1m,10m"})
    with caplog.at_level(logging.WARNING, logger="consumer.clients"):
        ensure_retry_topics(settings, {"bootstrap.servers": "b:9092"})
    assert admin.created == [("in-retry-600s", 6, -1)]  # the brokers' default replication factor
    assert "retry topic in-retry-60s has 3 partitions, the input topic in 6" in caplog.text
    scripted(monkeypatch, {})
    ensure_retry_topics(Settings.from_environ({"INPUT_TOPIC": "in"}), {"bootstrap.servers": "b:9092"})
    assert ScriptedAdmin.created == []  # no RETRY_DELAYS: nothing asked


def test_retry_topics_that_cannot_be_created_stop_the_start(monkeypatch):
    import pytest
    from confluent_kafka import KafkaError

    from consumer.clients import RetryTopicsMissing, ensure_retry_topics
    from consumer.settings import Settings

    scripted(monkeypatch, {"in": 6}, refusal=KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not authorized"))
    settings = Settings.from_environ({"INPUT_TOPIC": "in", "RETRY_DELAYS": "1m"})
    with pytest.raises(RetryTopicsMissing, match="in-retry-60s: not authorized.*with 6 partitions"):
        ensure_retry_topics(settings, {"bootstrap.servers": "b:9092"})


def test_unreachable_brokers_leave_the_retry_topics_to_later(caplog):
    from consumer.clients import ensure_retry_topics
    from consumer.settings import Settings

    settings = Settings.from_environ({"INPUT_TOPIC": "in", "RETRY_DELAYS": "1m"})
    with caplog.at_level(logging.WARNING, logger="consumer.clients"):
        ensure_retry_topics(settings, {"bootstrap.servers": "127.0.0.1:9"}, timeout=1.0)
    assert "cannot check the retry topics ['in-retry-60s'] exist" in caplog.text
