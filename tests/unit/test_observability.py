"""The side server's probes over real HTTP, lag from librdkafka statistics, /infer's shared engine,
JSON log lines and credential redaction: no broker, no model."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from PIL import Image

from consumer.engine.base import EngineInfo, Generation, GenerationBatch, GenerationRequest
from consumer.engine.shared import SharedEngine, _Rider
from consumer.logs import JsonFormatter, event_fields
from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.state import ServiceState
from consumer.web.server import SideServer, build_app
from devtools.local_kafka import free_port
from tests.support import http_get

INFO = EngineInfo(
    model="m",
    adapter=None,
    device="cpu",
    dtype="float32",
    backend="transformers",
    model_load_time=1.5,
    default_batch_size=16,
)


@pytest.fixture
def side_server():
    """The real app on a free port; yields (url, state, metrics)."""
    settings = Settings(http_port=free_port(), liveness_timeout=5)
    state, metrics = ServiceState(model="m"), Metrics()
    server = SideServer(build_app(settings, state, metrics), "127.0.0.1", settings.http_port)
    server.start()
    yield f"http://127.0.0.1:{settings.http_port}", state, metrics
    server.stop()


def status_of(url: str) -> tuple[int, dict]:
    status, body = http_get(url)
    return status, json.loads(body)


def test_readiness_needs_a_warm_model_and_the_group(side_server):
    url, state, metrics = side_server
    status, body = status_of(url + "/health")
    assert status == 503 and body["model_loaded"] is False and body["model"] == "m"  # nothing loaded
    state.engine = INFO
    state.ready, state.in_group = True, True
    assert status_of(url + "/health")[0] == 503  # loaded, not warmed
    state.warmup_time = 0.2
    status, body = status_of(url + "/health")
    assert status == 200 and body["status"] == "healthy" and body["model_load_time"] == 1.5
    assert b"diagram_ready 1.0" in http_get(url + "/metrics")[1]
    state.in_group = False
    assert status_of(url + "/health")[0] == 503
    assert b"diagram_ready 0.0" in http_get(url + "/metrics")[1]


def test_liveness_follows_the_poll_loop(side_server):
    url, state, _ = side_server
    assert status_of(url + "/health/live") == (
        200,
        {"status": "starting", "last_poll_age_seconds": None, "liveness_timeout_seconds": 5.0},
    )
    state.last_poll = time.time()
    assert status_of(url + "/health/live")[0] == 200
    state.last_poll = time.time() - 6
    status, body = status_of(url + "/health/live")
    assert status == 503 and body["status"] == "stalled"


def test_infer_is_not_served_unless_enabled(side_server):
    url = side_server[0]
    assert http_get(url + "/infer")[0] == 404
    assert "/infer" not in status_of(url + "/openapi.json")[1]["paths"]


def stats_document(partitions: dict[str, dict]) -> dict:
    return {"topics": {"in": {"partitions": {"-1": {"desired": False, "consumer_lag": -1}, **partitions}}}}


def lag_samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    family = next(f for f in metrics.registry.collect() if f.name == "diagram_consumer_lag")
    return {(s.labels["topic"], s.labels["partition"]): s.value for s in family.samples}


def test_consumer_lag_comes_from_statistics_for_owned_partitions_only():
    metrics = Metrics()
    metrics.observe_consumer_stats(
        stats_document(
            {
                "0": {"desired": True, "consumer_lag": 7},
                "1": {"desired": True, "consumer_lag": -1},  # nothing committed yet: unknown, not zero
                "2": {"desired": False, "consumer_lag": 3},  # another member's partition
            }
        )
    )
    assert lag_samples(metrics) == {("in", "0"): 7.0}
    metrics.observe_consumer_stats(stats_document({"1": {"desired": True, "consumer_lag": 2}}))
    assert lag_samples(metrics) == {("in", "1"): 2.0}  # partition 0 went elsewhere: its series is gone


class RecordingEngine:
    """Answers each image with its width, records batch sizes and overlapping calls, fails on width 1."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.active = 0
        self.overlaps = 0

    def generate(self, requests):
        self.active += 1
        self.overlaps += self.active > 1
        time.sleep(0.01)
        self.active -= 1
        self.batches.append(len(requests))
        if any(r.image.size[0] == 1 for r in requests):
            raise ValueError("bad image")
        return GenerationBatch([Generation(text=str(r.image.size[0]), output_tokens=1) for r in requests], 0.01)

    def prepare_image(self, image):
        return None


def request(width: int) -> GenerationRequest:
    return GenerationRequest(image=Image.new("RGB", (width, 1)), prompt="p")


def test_waiting_infer_images_ride_in_the_pipelines_next_batch():
    engine = RecordingEngine()
    shared = SharedEngine(engine, batch_size=4)
    riders = [_Rider(request(width)) for width in (10, 11, 12)]
    shared._waiting.extend(riders)
    assert [g.text for g in shared.generate([request(2), request(3)]).generations] == ["2", "3"]
    assert engine.batches == [4]  # two free seats taken, the third rider waits for the next call
    assert [r.generation.text for r in riders[:2]] == ["10", "11"] and not riders[2].done.is_set()


def test_pipeline_and_infer_never_run_the_model_at_once():
    engine = RecordingEngine()
    shared = SharedEngine(engine, batch_size=3)
    answers: dict[int, str] = {}

    def infer(width: int) -> None:
        answers[width] = shared.infer(request(width))[0].text

    def pipeline() -> None:
        for width in range(100, 110):
            assert shared.generate([request(width)]).generations[0].text == str(width)

    threads = [threading.Thread(target=infer, args=(w,)) for w in range(10, 30)] + [threading.Thread(target=pipeline)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == {w: str(w) for w in range(10, 30)}
    assert engine.overlaps == 0 and max(engine.batches) <= 3


def test_a_bad_infer_image_does_not_fail_the_pipelines_images():
    engine = RecordingEngine()
    shared = SharedEngine(engine, batch_size=4)
    rider = _Rider(request(1))
    shared._waiting.append(rider)
    assert [g.text for g in shared.generate([request(5), request(6)]).generations] == ["5", "6"]
    assert rider.done.is_set() and isinstance(rider.error, ValueError)


def test_json_log_lines_carry_the_event_fields():
    record = logging.LogRecord("consumer.pipeline", logging.INFO, __file__, 1, "described %s", ("x",), None)
    for key, value in event_fields("order-17", "in", 2, 1045, "ok", inference_time=1.5).items():
        setattr(record, key, value)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "described x"
    assert {k: entry[k] for k in ("id", "topic", "partition", "offset", "outcome", "inference_time")} == {
        "id": "order-17",
        "topic": "in",
        "partition": 2,
        "offset": 1045,
        "outcome": "ok",
        "inference_time": 1.5,
    }


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
