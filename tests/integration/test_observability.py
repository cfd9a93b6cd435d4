"""Health, metrics, logs and POST /infer of one running service, as operators and old clients see them.

One service (a real subprocess, the tiny model, the real broker) serves every test in this module:
it starts with its STALL_FILE present (TEST_HOOK=tests.hooks:stall_while_file_exists), so it is held
after loading and before its warm-up (what /health says then is recorded), then processes a few
events. A real Prometheus scrapes it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from devtools.local_kafka import free_port
from devtools.samples import png_bytes, sample_diagram
from tests.support import REPO_ROOT, ServiceRunner, create_test_topics, http_get, produce, read_records

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
SCALED_OBJECT = REPO_ROOT / "deploy" / "k8s" / "base" / "scaledobject.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "diagram-consumer.json"
GOOD_EVENTS = 4
OLD_INFER_METADATA = {"inference_time", "generation_time", "image_size", "model", "device"}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not on PATH: run `sh deploy/prometheus/install.sh` (make test does)")
    return path


def wait_for(condition, timeout: float, interval: float = 0.2):
    """Call `condition` until it returns something truthy; return that, or the last value at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@dataclass
class ObservedService:
    runner: ServiceRunner
    stall_file: Path
    topics: object
    startup_health: list[tuple[int, dict]] = field(default_factory=list)
    startup_live: tuple[int, dict] | None = None
    startup_infer: tuple[int, dict] | None = None


@pytest.fixture(scope="module")
def observed(kafka_bootstrap, tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("observed")
    topics = create_test_topics(kafka_bootstrap, "observability")
    stall_file = workdir / "stall"
    stall_file.touch()
    runner = ServiceRunner(
        kafka_bootstrap,
        topics,
        tiny_model,
        workdir,
        {
            "INFER_ENDPOINT": "true",
            "LOG_FORMAT": "json",
            "LIVENESS_TIMEOUT": "2",
            "TEST_HOOK": "tests.hooks:stall_while_file_exists",
            "STALL_FILE": str(stall_file),
            "KAFKA_STATISTICS_INTERVAL_MS": "500",
            "BATCH_SIZE": "4",
        },
    )
    observed = ObservedService(runner, stall_file, topics)
    runner.start(wait_ready=False)
    try:
        # Held before the warm-up: every answer until the model is loaded, and the one after, is recorded.
        def loaded_and_held() -> bool:
            assert runner.process.poll() is None, runner.log()
            try:
                status, body = runner.health()
            except OSError:
                return False
            observed.startup_health.append((status, body))
            return body["model_loaded"] and body["processor_loaded"]

        assert wait_for(loaded_and_held, 120), runner.log()
        status, body = http_get(runner.url + "/health/live")
        observed.startup_live = (status, json.loads(body))
        observed.startup_infer = post_file(runner.url + "/infer", png_bytes(sample_diagram(1, (320, 240))), "d.png")
        stall_file.unlink()
        runner.wait_ready()

        records = [
            (
                f"obs-{index}",
                json.dumps(
                    {
                        "id": f"obs-{index}",
                        "image": {"base64": base64.b64encode(png_bytes(sample_diagram(index, (320, 240)))).decode()},
                    }
                ),
            )
            for index in range(GOOD_EVENTS)
        ]
        records.append(("obs-bad", b"{not json"))
        produce(kafka_bootstrap, topics.input, records)
        assert len(read_records(kafka_bootstrap, topics.output, GOOD_EVENTS, timeout=90)) == GOOD_EVENTS, runner.log()
        assert len(read_records(kafka_bootstrap, topics.dlq, 1, timeout=30)) == 1, runner.log()
        yield observed
    finally:
        if stall_file.exists():
            stall_file.unlink()
        runner.stop()


def post_file(url: str, data: bytes, filename: str) -> tuple[int, dict]:
    """POST multipart/form-data with field `file`, as `curl -F file=@diagram.png` does."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- health -----------------------------------------------------------------------------------------
def test_readiness_is_503_until_the_model_is_warm(observed):
    assert observed.startup_health, "the side server never answered during startup"
    assert all(status == 503 for status, _ in observed.startup_health), observed.startup_health
    status, held = observed.startup_health[-1]
    assert held["status"] == "unavailable" and held["model_loaded"] and held["warmup_time"] is None
    assert observed.startup_live[0] == 200 and observed.startup_live[1]["status"] == "starting"
    assert observed.startup_infer[0] == 503  # /infer refuses until the model is warm

    status, health = observed.runner.health()
    assert status == 200, health
    assert health["status"] == "healthy" and health["warmup_time"] is not None
    assert {"status", "model_loaded", "processor_loaded", "device", "model_load_time"} <= set(health)
    assert health["group"] == observed.topics.group
    assert sorted(health["assigned_partitions"]) == [f"{observed.topics.input}[{p}]" for p in range(3)]
    assert health["paused_partitions"] == [] and health["last_poll_age_seconds"] < 2


def test_liveness_turns_503_while_the_poll_loop_is_stalled(observed):
    runner = observed.runner
    assert http_get(runner.url + "/health/live")[0] == 200
    observed.stall_file.touch()
    try:
        stalled = wait_for(lambda: http_get(runner.url + "/health/live")[0] == 503, timeout=30)
        status, body = http_get(runner.url + "/health/live")
    finally:
        observed.stall_file.unlink()
    assert stalled, runner.log()
    assert json.loads(body)["status"] == "stalled"
    assert wait_for(lambda: http_get(runner.url + "/health/live")[0] == 200, timeout=30), runner.log()


# -- metrics through a real Prometheus ----------------------------------------------------------------
class Prometheus:
    """A Prometheus server of our own: the shipped scrape config and alert rules, pointed at `target`."""

    def __init__(self, workdir: Path, target: str) -> None:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [
                require("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
        )
        ready = wait_for(lambda: self._answers("/-/ready"), timeout=60)
        assert ready, self.log_path.read_text()[-3000:]

    def _answers(self, path: str) -> bool:
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return http_get(self.url + path, timeout=2)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def prometheus(observed, tmp_path_factory):
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{observed.runner.port}")
    yield server
    server.stop()


def test_prometheus_scrapes_processed_events(observed, prometheus):
    ok_series = 'diagram_events_total{job="diagram-consumer", outcome="ok"}'

    def processed() -> float:
        result = prometheus.query(ok_series)
        return float(result[0]["value"][1]) if result else 0.0

    assert wait_for(lambda: processed() == GOOD_EVENTS, timeout=30), prometheus.query(ok_series)
    dead = prometheus.query('diagram_events_total{outcome="dead_lettered"}')
    assert float(dead[0]["value"][1]) == 1
    lag = wait_for(lambda: prometheus.query(f'diagram_consumer_lag{{topic="{observed.topics.input}"}}'), timeout=30)
    assert sorted(sample["metric"]["partition"] for sample in lag) == ["0", "1", "2"]
    assert all(float(sample["value"][1]) == 0 for sample in lag)  # everything processed and committed
    info = prometheus.query("diagram_consumer_info")[0]["metric"]
    assert info["device"] == "cpu" and info["adapter"].endswith("adapter") and info["model"]
    # What KEDA scales on: the replica's queued seconds of work, and the trigger's own query over them
    # answers one value (KEDA refuses several), 0 with everything processed and committed.
    queued = prometheus.query('diagram_queued_work_seconds{job="diagram-consumer"}')
    assert [float(sample["value"][1]) for sample in queued] == [0], queued
    assert prometheus.query('diagram_generation_seconds_per_event{job="diagram-consumer"}')
    (trigger,) = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"]
    answer = prometheus.query(trigger["metadata"]["query"])
    assert len(answer) == 1 and float(answer[0]["value"][1]) == 0, answer
    # The NoProgress alert reads the replica's age from the process collector.
    [age] = prometheus.query('time() - process_start_time_seconds{job="diagram-consumer"}')
    assert 0 < float(age["value"][1]) < 600


def test_every_stage_histogram_has_observations(observed):
    _, body = http_get(observed.runner.url + "/metrics")
    counts = {}
    for line in body.decode().splitlines():
        if line.startswith("diagram_stage_duration_seconds_count"):
            stage = line.split('stage="')[1].split('"')[0]
            counts[stage] = float(line.rsplit(" ", 1)[1])
    assert set(counts) == {"fetch", "decode", "prepare", "preprocess", "generate", "publish", "end_to_end"}
    assert all(count > 0 for count in counts.values()), counts


def test_promtool_accepts_the_exposition_and_the_rules(observed):
    promtool = require("promtool")
    _, body = http_get(observed.runner.url + "/metrics")
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    rules = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")], capture_output=True, timeout=60
    )
    assert rules.returncode == 0, rules.stdout.decode() + rules.stderr.decode()


def test_alert_rules_and_dashboard_queries_evaluate_on_the_scraped_series(observed, prometheus):
    def rules_evaluated():
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else None

    rules = wait_for(rules_evaluated, timeout=30)
    assert rules, prometheus.api("rules")
    assert {rule["name"] for rule in rules} >= {
        "DiagramConsumerLagGrowing",
        "DiagramConsumerDeadLetterRate",
        "DiagramConsumerPollLoopStalled",
        "DiagramConsumerDown",
        "DiagramConsumerNoProgress",
    }
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (
            panel["title"],
            target["expr"].replace("$__rate_interval", "1m").replace('"$job"', '".*"').replace('"$instance"', '".*"'),
        )
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]

    def panels_without_data() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in queries if not prometheus.query(expr)]

    # Rates need two scrapes inside their window; after that, a panel over no series at all is a
    # broken panel (a series that is 0 still shows).
    assert wait_for(lambda: not panels_without_data(), timeout=30, interval=1), panels_without_data()


# -- the old HTTP service's endpoints -----------------------------------------------------------------
def test_post_infer_returns_the_old_json_shape(observed):
    url = observed.runner.url
    status, answer = post_file(url + "/infer", png_bytes(sample_diagram(7, (640, 480))), "diagram.png")
    assert status == 200, answer
    assert {"description", "metadata"} <= set(answer)  # the old shape, with structured fields added
    assert isinstance(answer["description"], str) and answer["description"]
    assert answer["structured"] is None and answer["structured_error"]  # the tiny model writes no table
    assert OLD_INFER_METADATA <= set(answer["metadata"])
    assert answer["metadata"]["image_size"] == [640, 480] and answer["metadata"]["device"] == "cpu"

    status, answer = post_file(url + "/infer", b"this is not a picture", "notes.txt")
    assert status == 400 and "raster image" in answer["detail"]

    status, index = http_get(url + "/")
    assert status == 200 and "POST /infer" in json.loads(index)["endpoints"]
    status, spec = http_get(url + "/openapi.json")
    spec = json.loads(spec)
    assert (
        spec["openapi"].startswith("3.")
        and "multipart/form-data" in spec["paths"]["/infer"]["post"]["requestBody"]["content"]
    )
    status, page = http_get(url + "/docs")
    assert status == 200 and b"openapi.json" in page


# -- logs ---------------------------------------------------------------------------------------------
def test_json_logs_carry_each_event(observed):
    lines = [line for line in observed.runner.log_path.read_text().splitlines() if line.strip()]
    entries = []
    for line in lines:
        entries.append(json.loads(line))  # with LOG_FORMAT=json every line the service writes is JSON
    events = {entry["id"]: entry for entry in entries if entry.get("topic") == observed.topics.input}
    assert {f"obs-{index}" for index in range(GOOD_EVENTS)} <= set(events)
    described = events["obs-0"]
    assert described["outcome"] == "ok" and isinstance(described["partition"], int)
    assert isinstance(described["offset"], int) and described["inference_time"] >= 0
    dead = [entry for entry in entries if entry.get("outcome") == "dead_lettered"]
    assert len(dead) == 1 and dead[0]["stage"] == "parse" and dead[0]["topic"] == observed.topics.input
