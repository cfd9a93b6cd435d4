"""deploy/k8s, rendered by kustomize and checked as an API server with KEDA and the Prometheus
operator would check it, then for agreement with the service: settings, probes, ports, shutdown, and
the seconds of work KEDA scales on."""

from __future__ import annotations

import copy
import re
import urllib.parse

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import (
    K8S_DIR,
    container_environment,
    find,
    named_port,
    scaler_parameters,
    selector_matches,
    settings_for,
    validate_k8s,
)

OVERLAYS = ["cpu", "gpu", "gpu+kafka-ca"]
KINDS = {
    "ConfigMap",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "PodMonitor",
    "ScaledObject",
    "PersistentVolumeClaim",
}


def consumer_container(docs: list[dict]) -> dict:
    containers = find(docs, "Deployment", "diagram-consumer")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "consumer")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(rendered, overlay):
    docs = rendered[overlay]
    assert {d["kind"] for d in docs} == KINDS
    for doc in docs:
        validate_k8s(doc)


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("Deployment", ["spec", "template", "spec"], "terminationGracePeriodSecond"),
        ("ScaledObject", ["spec"], "maxReplicas"),
        ("PodMonitor", ["spec"], "podMetricEndpoints"),
        ("ScaledObject", ["spec", "fallback"], "replica"),
    ],
)
def test_validation_rejects_a_misspelt_field(rendered, kind, path, typo):
    # The validation above means something only if it rejects what an API server would.
    doc = copy.deepcopy(find(rendered["gpu"], kind))
    target = doc
    for key in path:
        target = target[key]
    target[typo] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_settings_are_real(rendered, overlay):
    docs = rendered[overlay]
    settings = settings_for(container_environment(docs, consumer_container(docs)))
    assert settings.device == ("cpu" if overlay == "cpu" else "cuda")
    if overlay.endswith("kafka-ca"):
        assert settings.kafka_extra["ssl.ca.location"].startswith("/etc/kafka-ca/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_the_ones_secrets_example_describes(rendered, overlay):
    example = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S_DIR / "secrets.example.yaml").read_text())}
    for secret in example.values():
        validate_k8s(secret)
    docs = rendered[overlay]
    container = consumer_container(docs)
    wanted = {
        (v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
        for v in container.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    for volume in find(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]:
        if "secret" in volume:
            wanted |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    for name, key in wanted:
        assert key in example[name]["stringData"], f"secrets.example.yaml: {name} has no key {key}"
    sasl = {v["name"] for v in container["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"} <= sasl


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_side_server_the_right_question(rendered, overlay, side_server):
    docs = rendered[overlay]
    container = consumer_container(docs)
    settings = settings_for(container_environment(docs, container))
    assert named_port(container, "http") == settings.http_port
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert named_port(container, probe["port"]) == settings.http_port
        assert ("GET", probe["path"]) in side_server.routes
    # The kubelet asks several times within LIVENESS_TIMEOUT, so a stall is seen soon after it starts.
    assert container["livenessProbe"]["periodSeconds"] < settings.liveness_timeout

    def status(kind: str) -> int:
        return side_server.get(probes[kind]["path"])[0]

    # While the model loads: not ready (no traffic, startup not done), but alive (not restarted).
    side_server.loading()
    assert (status("startupProbe"), status("readinessProbe"), status("livenessProbe")) == (503, 503, 200)
    side_server.ready()
    assert (status("startupProbe"), status("readinessProbe"), status("livenessProbe")) == (200, 200, 200)
    # A stuck poll loop: the kubelet restarts the pod.
    side_server.stalled()
    assert status("livenessProbe") == 503
    side_server.ready()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_shutdown_timeout(rendered, overlay):
    docs = rendered[overlay]
    settings = settings_for(container_environment(docs, consumer_container(docs)))
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_found_by_every_scraper(rendered, overlay, side_server):
    docs = rendered[overlay]
    deployment = find(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = consumer_container(docs)
    settings = settings_for(container_environment(docs, container))

    def serves_metrics(path: str) -> bool:
        status, content_type, body = side_server.get(path)
        return status == 200 and content_type.startswith("text/plain") and "# HELP diagram_" in body

    assert selector_matches(deployment["spec"]["selector"], pod_labels)
    service = find(docs, "Service", "diagram-consumer-metrics")
    assert selector_matches(service["spec"]["selector"], pod_labels)
    assert {named_port(container, p["targetPort"]) for p in service["spec"]["ports"]} == {settings.http_port}
    monitor = find(docs, "PodMonitor")
    assert selector_matches(monitor["spec"]["selector"], pod_labels)
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert named_port(container, endpoint["port"]) == settings.http_port
        assert serves_metrics(endpoint["path"])
    # The job label the alert rules and the dashboard select on, as in deploy/prometheus/prometheus.yml.
    prometheus = yaml.safe_load((K8S_DIR.parent / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    assert pod_labels[monitor["spec"]["jobLabel"]] in jobs
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.http_port
    assert serves_metrics(annotations["prometheus.io/path"])
    pdb = find(docs, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"], pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_on_the_seconds_of_work_the_replicas_export(rendered, overlay):
    from consumer.metrics import Metrics

    docs = rendered[overlay]
    scaled = find(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == find(docs, "Deployment")["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    lowest, highest = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert 1 <= lowest <= highest
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # The group's total shared out: TARGET_DRAIN_SECONDS of work per replica (and the fallback needs it).
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    metadata = trigger["metadata"]

    # Every key is a parameter KEDA's Prometheus scaler reads (from its source).
    parameters = scaler_parameters()
    for key in metadata:
        assert key in parameters and "triggerMetadata" in parameters[key].orders, f"KEDA reads no {key}"

    # The overlay's own settings, copied in by components/scaling.
    scaling = find(docs, "ConfigMap", "diagram-consumer-scaling")["data"]
    assert float(metadata["threshold"]) == float(scaling["TARGET_DRAIN_SECONDS"]) > 0
    assert metadata["serverAddress"] == scaling["PROMETHEUS_SERVER_ADDRESS"]
    address = urllib.parse.urlparse(metadata["serverAddress"])
    assert address.scheme in ("http", "https") and address.netloc

    # The query sums what the service exports, over the job label the PodMonitor gives its pods.
    exposed = {family.name for family in Metrics().registry.collect()}
    named = set(re.findall(r"\bdiagram_[a-z_]+", metadata["query"]))
    assert "diagram_queued_work_seconds" in named and named <= exposed, named - exposed
    monitor = find(docs, "PodMonitor")
    pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert re.findall(r'\bjob="([^"]*)"', metadata["query"]) == [pod_labels[monitor["spec"]["jobLabel"]]]
    assert metadata["query"].startswith("sum(")  # one value: KEDA refuses a query answering several

    # No series (nothing scraped) and NaN (work not measured yet) fail over; they never read as no work.
    assert metadata["ignoreNullValues"] == "false"
    fallback = scaled["spec"]["fallback"]
    assert fallback["failureThreshold"] >= 1 and lowest <= fallback["replicas"] <= highest


def test_overlays_fit_their_hardware(rendered):
    for overlay, tag in (("cpu", "cpu"), ("gpu", "cuda")):
        docs = rendered[overlay]
        container = consumer_container(docs)
        assert container["image"].endswith(f":{tag}")
        pod = find(docs, "Deployment")["spec"]["template"]["spec"]
        resources = container["resources"]
        if overlay == "gpu":
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            # No surge pod: a rollout must not need a spare GPU.
            assert find(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
        else:
            assert "nvidia.com/gpu" not in resources.get("limits", {})
            env = container_environment(docs, container)
            cpus = re.fullmatch(r"(\d+)", str(resources["requests"]["cpu"]))
            assert cpus and env["OMP_NUM_THREADS"] == cpus.group(1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_fits_the_image(rendered, overlay):
    from tests.deploy.manifests import Dockerfile

    docs = rendered[overlay]
    container = consumer_container(docs)
    settings = settings_for(container_environment(docs, container))
    image = Dockerfile().image_config({"VARIANT": "cpu" if overlay == "cpu" else "cuda", "MODEL_SOURCE": "hub"})
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    # The image's user, so the volumes it writes (fsGroup) are its own.
    uid, _, gid = image.user.partition(":")
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["fsGroup"] == int(gid or uid)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # The adapter where ADAPTER_PATH points, read-only; the model cache where the image's HF_HOME is,
    # writable (the root filesystem is read-only).
    adapter = mounts[str(settings.adapter_path)]
    assert adapter.get("readOnly") is True
    cache = mounts[settings.hf_home or image.env["HF_HOME"]]
    assert not cache.get("readOnly") and "emptyDir" in volumes[cache["name"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts
