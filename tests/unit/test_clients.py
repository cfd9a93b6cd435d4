"""fit_to_topic_limits without a broker: the producer config is left as it was, and the service starts.

With a broker (the limit read and applied, an oversized result dead-lettered alone):
tests/integration/test_delivery.py.
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
