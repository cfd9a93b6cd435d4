"""The side server's probes over real HTTP: readiness, liveness, and /infer only when enabled."""

from __future__ import annotations

import json
import time

import pytest

from consumer.engine.base import EngineInfo
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
