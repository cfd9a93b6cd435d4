"""docker-compose.yml, as the compose CLI resolves it (no Docker engine here, so nothing is started):
every service has what it needs, the consumer's settings are real, its port, probes and scrape target
agree with the side server, and the topics job creates the topics the consumer reads and writes (its
retry topics included, named in sh as the service names them)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (
    K8S_DIR,
    REPO_ROOT,
    compose_cli,
    compose_config,
    container_ports,
    duration_seconds,
    host_path,
    kustomize_build,
    mounts,
    settings_for,
)

CONSUMERS = {"cpu": "diagram-consumer", "gpu": "diagram-consumer-gpu"}
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"


def started_with(compose: dict, profile: str) -> set[str]:
    """The services `docker compose up` starts with one profile enabled (the compose spec's rule)."""
    return {name for name, s in compose["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def test_the_cli_rejects_a_broken_file(tmp_path):
    # The check below means something only if the CLI does validate: a misspelt key must fail it.
    broken = tmp_path / "docker-compose.yml"
    original = (REPO_ROOT / "docker-compose.yml").read_text()
    broken.write_text(original.replace("stop_grace_period:", "stop_grace_periods:"))
    with pytest.raises(AssertionError, match="rejected"):
        compose_config(compose_cli(), broken)


def test_every_service_has_an_image_and_its_files(compose):
    for name, service in compose["services"].items():
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"
        if "build" not in service:
            # A pulled image is pinned: `docker compose up` next year starts the same stack.
            tag = service["image"].rpartition(":")[2]
            assert "/" not in tag and tag not in ("", "latest"), f"{name}: {service['image']} is not pinned"
        if "build" in service:
            context = Path(service["build"]["context"])
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
        for mount in mounts(service):
            if mount.bind:
                assert Path(mount.source).exists(), f"{name}: {mount.source} (mounted at {mount.target}) is missing"
            else:
                assert mount.source in (compose.get("volumes") or {}), f"{name}: volume {mount.source} undeclared"
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown {dependency}"


def test_default_profile_runs_the_cpu_consumer_and_gpu_profile_the_gpu_one(compose):
    lines = (REPO_ROOT / ".env").read_text().splitlines()
    dotenv = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert dotenv["COMPOSE_PROFILES"] == "cpu"
    for profile, consumer in CONSUMERS.items():
        services = started_with(compose, profile)
        assert {"kafka", "topics", "prometheus", "grafana", consumer} <= services
        assert not (set(CONSUMERS.values()) - {consumer}) & services, f"profile {profile} starts two consumers"
    cpu, gpu = (compose["services"][CONSUMERS[p]] for p in ("cpu", "gpu"))
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and cpu["image"].endswith(":cpu")
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["image"].endswith(":cuda")
    assert "deploy" not in cpu
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # Whichever runs, it answers to the name Prometheus scrapes.
    assert "diagram-consumer" in gpu["networks"]["default"]["aliases"]


@pytest.mark.parametrize("profile", CONSUMERS)
def test_consumer_settings_are_real_and_point_at_the_stack(compose, profile):
    service = compose["services"][CONSUMERS[profile]]
    settings = settings_for(environment(service))
    assert settings.device == ("cuda" if profile == "gpu" else "cpu")
    host, port = settings.kafka_bootstrap_servers.split(":")
    kafka = compose["services"]["kafka"]
    assert host == "kafka"
    assert f"PLAINTEXT://kafka:{port}" in environment(kafka)["KAFKA_ADVERTISED_LISTENERS"]
    # The adapter, read-only where ADAPTER_PATH points; the model cache on a named volume.
    adapter = next(m for m in mounts(service) if m.target == str(settings.adapter_path))
    assert adapter.bind and adapter.read_only and Path(adapter.source) == REPO_ROOT / "weights"
    assert any(not m.bind for m in mounts(service) if m.target == "/app/cache/huggingface")
    assert settings.http_port in container_ports(service)
    # SIGTERM, then SHUTDOWN_TIMEOUT to finish in-flight work, then the kill.
    assert duration_seconds(service["stop_grace_period"]) > settings.shutdown_timeout


def test_prometheus_scrapes_the_consumer_and_loads_the_rules(compose, side_server):
    prometheus = compose["services"]["prometheus"]
    config_file = host_path(prometheus, PROMETHEUS_CONFIG)
    assert config_file is not None and config_file.is_file(), f"nothing mounted at {PROMETHEUS_CONFIG}"
    config = yaml.safe_load(config_file.read_text())
    settings = settings_for(environment(compose["services"][CONSUMERS["cpu"]]))
    consumer_target = f"diagram-consumer:{settings.http_port}"
    jobs = [
        job
        for job in config["scrape_configs"]
        if any(consumer_target in group.get("targets", []) for group in job.get("static_configs", []))
        or any(
            "diagram-consumer" in sd.get("names", []) and sd.get("port") == settings.http_port
            for sd in job.get("dns_sd_configs", [])
        )
    ]
    assert jobs, f"no scrape job targets {consumer_target}"
    for job in jobs:
        status, content_type, body = side_server.get(job.get("metrics_path", "/metrics"))
        assert status == 200 and content_type.startswith("text/plain") and "# HELP diagram_" in body
    assert config.get("rule_files"), "no alert rules loaded"
    for rule_file in config["rule_files"]:
        inside = rule_file if rule_file.startswith("/") else os.path.join(os.path.dirname(PROMETHEUS_CONFIG), rule_file)
        source = host_path(prometheus, inside)
        assert source is not None and source.is_file(), f"rule file {rule_file} is not mounted into Prometheus"
        assert yaml.safe_load(source.read_text())["groups"], f"{source} holds no rule groups"


def test_grafana_gets_the_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    datasources = [
        ds for f in (provisioning / "datasources").glob("*.y*ml") for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    prometheus_ds = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus_ds and all(ds["url"] == "http://prometheus:9090" for ds in prometheus_ds)
    assert 9090 in container_ports(compose["services"]["prometheus"])
    providers = [
        p for f in (provisioning / "dashboards").glob("*.y*ml") for p in yaml.safe_load(f.read_text())["providers"]
    ]
    dashboards = []
    for provider in providers:
        directory = host_path(grafana, provider["options"]["path"])
        assert directory is not None and directory.is_dir(), f"dashboard path {provider['options']['path']} not mounted"
        dashboards += list(directory.rglob("*.json"))
    assert dashboards, "no dashboard JSON where the provider looks"
    home = host_path(grafana, environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home in dashboards


def run_topics_job(job: dict, workdir: Path, **overrides: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Runs the job's own shell script, with a stand-in for kafka-topics.sh that records its arguments
    (there is no Kafka CLI here; the broker side of `--create` is Kafka's, not ours); returns the topics
    it creates with their partition counts."""
    script = job["command"][0] if isinstance(job["command"], list) else job["command"]
    script = script.replace("$$", "$")  # compose's escape for a literal $
    calls = workdir / "calls"
    calls.unlink(missing_ok=True)
    recorder = workdir / "kafka-topics.sh"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n')
    recorder.chmod(0o755)
    script = script.replace("/opt/kafka/bin/kafka-topics.sh", str(recorder))
    env = {"PATH": os.environ["PATH"], **{k: str(v) for k, v in environment(job).items()}, **overrides}
    subprocess.run([*job["entrypoint"], script], env=env, check=True, timeout=30)
    created: dict[str, int] = {}
    configs: dict[str, list[str]] = {}
    for call in calls.read_text().splitlines():
        if "--create" in call.split():
            words = call.split()
            assert "--if-not-exists" in words, "a second `up` would fail on existing topics"
            topic = words[words.index("--topic") + 1]
            created[topic] = int(words[words.index("--partitions") + 1])
            configs[topic] = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
    return created, configs


def test_topics_job_creates_the_consumers_topics_with_the_intended_partitions(compose, tmp_path):
    job = compose["services"]["topics"]
    assert job["image"] == compose["services"]["kafka"]["image"]
    assert job["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert job["entrypoint"][:1] == ["/bin/sh"]
    created, configs = run_topics_job(job, tmp_path)
    consumer = settings_for(environment(compose["services"][CONSUMERS["cpu"]]))
    retry_topics = consumer.retry_topics()
    assert retry_topics, "the stack runs with RETRY_DELAYS, and the job creates its topics"
    assert consumer.result_cache_topic is not None
    assert set(created) == {
        consumer.input_topic, consumer.output_topic, consumer.dlq_topic, consumer.result_cache_topic, *retry_topics
    }  # fmt: skip
    assert all(created[topic] == created[consumer.input_topic] for topic in retry_topics)
    # The result cache keeps one entry per key, and never loses one to retention.
    assert configs[consumer.result_cache_topic] == ["cleanup.policy=compact"]

    # The input topic's partitions are the most replicas that can share the work: KEDA's cap.
    scaled = next(d for d in kustomize_build(K8S_DIR / "overlays" / "gpu") if d["kind"] == "ScaledObject")
    assert created[consumer.input_topic] == scaled["spec"]["maxReplicaCount"]


@pytest.mark.parametrize("delays", ["250ms,1s,90,2d,45m", "1h", ""])
def test_topics_job_names_retry_topics_as_the_service_does(compose, tmp_path, delays):
    job = compose["services"]["topics"]
    created, _ = run_topics_job(job, tmp_path, RETRY_DELAYS=delays)
    consumer = settings_for({**environment(compose["services"][CONSUMERS["cpu"]]), "RETRY_DELAYS": delays})
    fixed = {consumer.input_topic, consumer.output_topic, consumer.dlq_topic, consumer.result_cache_topic}
    assert set(created) - fixed == set(consumer.retry_topics())


def test_broker_is_the_version_the_tests_run(compose):
    pom = (REPO_ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{version}"
