"""Settings keep the old service's names and pass any librdkafka property through."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer.settings import Settings


def test_old_service_names_and_defaults():
    settings = Settings.from_environ(
        {
            "BASE_MODEL_ID": "/models/qwen",
            "ADAPTER_PATH": "/w",
            "DEVICE": "cpu",
            "TORCH_DTYPE": "float32",
            "MAX_NEW_TOKENS": "100",
            "HF_TOKEN": "hf_secret",
        }
    )
    assert settings.base_model_id == "/models/qwen"
    assert str(settings.adapter_path) == "/w"
    assert settings.device == "cpu" and settings.torch_dtype == "float32"
    assert settings.max_new_tokens == 100
    assert "hf_secret" not in repr(settings)
    defaults = Settings.from_environ({})
    assert defaults.http_port == 8002 and defaults.max_new_tokens == 384
    assert defaults.base_model_id == "Qwen/Qwen3-VL-2B-Instruct"


def test_kafka_passthrough_reaches_librdkafka_config_and_is_redacted():
    settings = Settings.from_environ(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "b1:9093",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD": "pw",
        }
    )
    consumer = settings.consumer_config()
    producer = settings.producer_config()
    for config in (consumer, producer):
        assert config["bootstrap.servers"] == "b1:9093"
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanism"] == "SCRAM-SHA-512"
        assert config["sasl.password"] == "pw"
    assert consumer["enable.auto.commit"] is False
    assert "bootstrap.servers" not in settings.kafka_extra
    assert settings.redacted_kafka_config()["sasl.password"] == "***"


def test_closed_choices_are_refused_with_the_field_named():
    with pytest.raises(ValidationError, match="device"):
        Settings.from_environ({"DEVICE": "tpu"})
    with pytest.raises(ValidationError, match="torch_dtype"):
        Settings.from_environ({"TORCH_DTYPE": "int3"})


def test_allowed_hosts_are_a_comma_separated_list():
    settings = Settings.from_environ({"IMAGE_ALLOWED_HOSTS": "Images.internal, 10.0.0.5 ,"})
    assert settings.image_allowed_hosts == frozenset({"images.internal", "10.0.0.5"})


def test_settings_are_frozen():
    settings = Settings.from_environ({})
    with pytest.raises(ValidationError):
        settings.max_new_tokens = 5


def test_kafka_secrets_never_appear_in_the_logged_config():
    settings = Settings.from_environ(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_USERNAME": "svc",
            "KAFKA_SASL_PASSWORD": "hunter2",
            "KAFKA_SSL_KEY_PASSWORD": "keypass",
            "KAFKA_SSL_KEY_PEM": "-----BEGIN PRIVATE KEY-----abc",
        }
    )
    shown = repr(settings.redacted_kafka_config())
    assert "svc" in shown
    assert not any(secret in shown for secret in ("hunter2", "keypass", "BEGIN PRIVATE KEY"))


def test_every_client_is_named_after_the_service_its_group_and_its_replica():
    import os
    import socket

    derived = Settings.from_environ({"KAFKA_GROUP_ID": "diagrams"})
    replica = f"{socket.gethostname()}-{os.getpid()}"
    assert derived.replica_name() == replica
    for config in (derived.consumer_config(), derived.producer_config()):
        assert config["client.id"] == f"diagram-consumer-diagrams-{replica}"
    assert derived.client_id(group="diagrams-replay-1") == f"diagram-consumer-diagrams-replay-1-{replica}"

    static = Settings.from_environ({"KAFKA_GROUP_ID": "diagrams", "KAFKA_GROUP_INSTANCE_ID": "pod-0"})
    assert static.replica_name() == "pod-0"
    assert static.consumer_config()["client.id"] == "diagram-consumer-diagrams-pod-0"

    named = Settings.from_environ({"KAFKA_GROUP_ID": "diagrams", "KAFKA_CLIENT_ID": "ocr-team"})
    for config in (named.consumer_config(), named.producer_config()):
        assert config["client.id"] == "ocr-team"
    assert named.client_id(group="other") == "ocr-team"


def test_retry_delays_name_one_topic_each_after_the_input_topic():
    settings = Settings.from_environ({"INPUT_TOPIC": "diagrams", "RETRY_DELAYS": "1m, 10m,1h,1m,250ms"})
    assert settings.retry_delays == (60_000, 600_000, 3_600_000, 60_000, 250)
    assert settings.retry_topics() == [
        "diagrams-retry-60s",
        "diagrams-retry-600s",
        "diagrams-retry-3600s",
        "diagrams-retry-250ms",
    ]
    assert Settings.from_environ({"RETRY_DELAYS": "90, 2d"}).retry_delays == (90_000, 172_800_000)
    for unset in ({}, {"RETRY_DELAYS": ""}):
        assert Settings.from_environ(unset).retry_delays == () and Settings.from_environ(unset).retry_topics() == []


@pytest.mark.parametrize("delays", ["1x", "-1s", "0s", "8d", ",".join(["1s"] * 17)])
def test_retry_delays_that_cannot_work_are_refused_with_the_field_named(delays):
    with pytest.raises(ValidationError, match="retry_delays"):
        Settings.from_environ({"RETRY_DELAYS": delays})


def test_adapters_name_further_adapters_beside_the_default():
    settings = Settings.from_environ(
        {"ADAPTER_PATH": "/w", "ADAPTERS": " bpmn=/m/bpmn, uml = /m/uml ,", "ADAPTER_POLL_SECONDS": "5"}
    )
    assert settings.adapters == (("bpmn", Path("/m/bpmn")), ("uml", Path("/m/uml")))
    assert settings.adapter_paths() == {"default": Path("/w"), "bpmn": Path("/m/bpmn"), "uml": Path("/m/uml")}
    assert settings.adapter_poll_seconds == 5
    unset = Settings.from_environ({})
    assert unset.adapters == () and unset.adapter_paths() == {"default": unset.adapter_path}
    assert unset.adapter_poll_seconds == 30


@pytest.mark.parametrize(
    "value, message",
    [
        ("default=/m/x", "'default' is the adapter at ADAPTER_PATH"),
        ("bpmn=/a,bpmn=/b", "named twice"),
        ("bpmn", "each adapter is name=path"),
        ("bpmn=", "each adapter is name=path"),
        ("b.v2=/a", "letters, digits"),
    ],
)
def test_adapters_refused_with_the_reason(value, message):
    with pytest.raises(ValidationError, match=message):
        Settings.from_environ({"ADAPTERS": value})


def test_echo_cannot_serve_adapters(tmp_path):
    with pytest.raises(ValidationError, match="ENGINE=echo runs no model"):
        Settings.from_environ({"ENGINE": "echo", "ADAPTER_PATH": str(tmp_path), "ADAPTERS": "b=/m/b"})
