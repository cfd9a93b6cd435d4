"""The aiohttp side server: /health (readiness), /health/live (liveness), /metrics (Prometheus), /.

It runs on its own event loop in its own thread, so a slow scrape never blocks polling and a busy
model never blocks a probe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

if TYPE_CHECKING:
    from consumer.engine.base import EngineInfo
    from consumer.metrics import Metrics
    from consumer.pipeline import ServiceState
    from consumer.settings import Settings

logger = logging.getLogger(__name__)

# The poll loop polls every 0.2 s; no iteration for this long means it is stuck.
LIVENESS_TIMEOUT_S = 60.0


def _gpu_memory(metrics: Metrics) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            metrics.gpu_memory_allocated.set(torch.cuda.memory_allocated())
            metrics.gpu_memory_reserved.set(torch.cuda.memory_reserved())
    except Exception:  # noqa: BLE001 - metrics must not fail a scrape
        logger.debug("cannot read GPU memory", exc_info=True)


def build_app(settings: Settings, info: EngineInfo, state: ServiceState, metrics: Metrics) -> web.Application:
    prometheus = make_aiohttp_handler(metrics.registry)

    def health_body() -> dict:
        poll_age = time.time() - state.last_poll if state.last_poll else None
        ready = state.ready and state.in_group and state.broker_ok and not state.stopping
        return {
            "status": "healthy" if ready else "unavailable",
            "model_loaded": info.model_loaded,
            "processor_loaded": info.processor_loaded,
            "device": info.device,
            "dtype": info.dtype,
            "model": info.model,
            "adapter": info.adapter,
            "model_load_time": info.model_load_time,
            "warmup_time": info.warmup_time,
            "group": settings.kafka_group_id,
            "in_group": state.in_group,
            "broker_ok": state.broker_ok,
            "assigned_partitions": state.assigned,
            "paused_partitions": state.paused,
            "last_poll_age_seconds": round(poll_age, 3) if poll_age is not None else None,
        }

    async def health(_: web.Request) -> web.Response:
        body = health_body()
        return web.json_response(body, status=200 if body["status"] == "healthy" else 503)

    async def live(_: web.Request) -> web.Response:
        poll_age = time.time() - state.last_poll if state.last_poll else time.time() - state.started_at
        alive = poll_age < LIVENESS_TIMEOUT_S
        body = {"status": "alive" if alive else "stalled", "last_poll_age_seconds": round(poll_age, 3)}
        return web.json_response(body, status=200 if alive else 503)

    async def metrics_handler(request: web.Request) -> web.StreamResponse:
        _gpu_memory(metrics)
        return await prometheus(request)

    async def index(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "service": "diagram-consumer",
                "description": "Kafka consumer turning diagram images into text with Qwen3-VL + LoRA",
                "input_topic": settings.input_topic,
                "output_topic": settings.output_topic,
                "dlq_topic": settings.dlq_topic,
                "model": info.model,
                "adapter": info.adapter,
                "device": info.device,
                "endpoints": ["/health", "/health/live", "/metrics"],
            }
        )

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/metrics", metrics_handler)
    return app


class SideServer:
    """Runs the app on its own loop in a daemon thread; `start` returns once the port is bound."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app, self.host, self.port = app, host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="side-server", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app, access_log=None)
        try:
            self._loop.run_until_complete(runner.setup())
            self._loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"side server cannot listen on {self.host}:{self.port}: {self._error}")
        logger.info("side server on http://%s:%d (/health, /health/live, /metrics)", self.host, self.port)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
