"""The aiohttp side server: / (info), /health (readiness), /health/live (liveness), /metrics,
/openapi.json and /docs, and POST /infer when INFER_ENDPOINT=true.

It runs on its own event loop in its own thread, so a slow scrape never blocks polling and a busy
model never blocks a probe; /infer hands its model work to worker threads for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.state import ServiceState
from consumer.web.infer import make_infer_handler
from consumer.web.openapi import DOCS_HTML, openapi_document

logger = logging.getLogger(__name__)


def _gpu_memory(metrics: Metrics) -> None:
    # Only where the engine already imported torch: importing it here would hold the server's loop
    # for seconds, and an engine without torch has no GPU memory to report.
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            metrics.gpu_memory_allocated.set(torch.cuda.memory_allocated())
            metrics.gpu_memory_reserved.set(torch.cuda.memory_reserved())
    except Exception:  # noqa: BLE001 - metrics must not fail a scrape
        logger.debug("cannot read GPU memory", exc_info=True)


def build_app(settings: Settings, state: ServiceState, metrics: Metrics) -> web.Application:
    """The side server's routes; POST /infer only with INFER_ENDPOINT=true."""
    prometheus = make_aiohttp_handler(metrics.registry)
    metrics.track_readiness(state.is_ready)
    endpoints = ["/", "/health", "/health/live", "/metrics", "/openapi.json", "/docs"]
    if settings.infer_endpoint:
        endpoints.append("POST /infer")
    document = openapi_document(infer_enabled=settings.infer_endpoint)

    def health_body() -> dict[str, Any]:
        age = state.poll_age()
        info = state.engine
        return {
            "status": "healthy" if state.is_ready() else "unavailable",
            "model_loaded": info is not None,
            "processor_loaded": info is not None,
            "device": info.device if info else None,
            "model_load_time": info.model_load_time if info else None,
            "model": info.model if info else state.model,
            "adapter": info.adapter if info else None,
            "adapters": list(info.adapter_names) if info else None,
            "dtype": info.dtype if info else None,
            "warmup_time": state.warmup_time,
            "group": settings.kafka_group_id,
            "in_group": state.in_group,
            "broker_ok": state.broker_ok,
            "assigned_partitions": state.assigned,
            "paused_partitions": state.paused,
            "waiting_partitions": state.waiting,
            "last_poll_age_seconds": round(age, 3) if age is not None else None,
        }

    async def health(_: web.Request) -> web.Response:
        body = health_body()
        return web.json_response(body, status=200 if body["status"] == "healthy" else 503)

    async def live(_: web.Request) -> web.Response:
        # Before the poll loop first runs the process is loading the model: alive, not stalled. A
        # load that hangs is the startup probe's business; a load that fails ends the process.
        age = state.poll_age()
        if age is None:
            status, alive = "starting", True
        elif state.stopping:
            status, alive = "stopping", True  # draining: the poll loop is no longer the measure
        else:
            alive = age < settings.liveness_timeout
            status = "alive" if alive else "stalled"
        body = {
            "status": status,
            "last_poll_age_seconds": round(age, 3) if age is not None else None,
            "liveness_timeout_seconds": settings.liveness_timeout,
        }
        return web.json_response(body, status=200 if alive else 503)

    async def metrics_handler(request: web.Request) -> web.StreamResponse:
        _gpu_memory(metrics)
        return await prometheus(request)

    async def index(_: web.Request) -> web.Response:
        info = state.engine
        return web.json_response(
            {
                "service": "diagram-consumer",
                "description": "Kafka consumer turning diagram images into text with Qwen3-VL + LoRA",
                "version": document["info"]["version"],
                "input_topic": settings.input_topic,
                "output_topic": settings.output_topic,
                "dlq_topic": settings.dlq_topic,
                "group": settings.kafka_group_id,
                "model": info.model if info else state.model,
                "adapter": info.adapter if info else None,
                "device": info.device if info else None,
                "endpoints": endpoints,
            }
        )

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(document)

    async def docs(_: web.Request) -> web.Response:
        return web.Response(text=DOCS_HTML, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    if settings.infer_endpoint:
        app.router.add_post("/infer", make_infer_handler(settings, state, metrics))
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
        logger.info("side server on http://%s:%d (/health, /health/live, /metrics, /docs)", self.host, self.port)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
