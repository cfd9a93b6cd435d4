"""`python -m consumer run`: load the model, start the side server, consume until stopped."""

from __future__ import annotations

import logging

from consumer.engine.base import Engine, EngineLoadError
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline, ServiceState
from consumer.server import SideServer, build_app
from consumer.settings import Settings

logger = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 3


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "echo":
        from consumer.engine.echo import EchoEngine

        logger.warning("ENGINE=echo: no model runs; every description is a fixed text (benchmarks only)")
        return EchoEngine()
    from consumer.engine.qwen import QwenVLEngine

    return QwenVLEngine(settings)


def run_service(settings: Settings) -> int:
    logger.info(
        "starting: model=%s adapter=%s device=%s dtype=%s kafka=%s",
        settings.base_model_id, settings.adapter_path, settings.device, settings.torch_dtype,
        settings.redacted_kafka_config(),
    )
    metrics = Metrics()
    state = ServiceState()
    engine = build_engine(settings)
    # The side server answers (503) while the model loads, so probes see a live, not-ready pod.
    server = SideServer(build_app(settings, engine.info, state, metrics), settings.http_host, settings.http_port)
    server.start()
    try:
        engine.load()
        engine.warm_up()
    except EngineLoadError as exc:
        logger.error("cannot start: %s", exc)
        server.stop()
        return EXIT_LOAD_FAILED
    info = engine.info
    metrics.model_load_seconds.set(info.model_load_time or 0)
    metrics.warmup_seconds.set(info.warmup_time or 0)
    metrics.build.info(
        {"model": info.model, "adapter": info.adapter or "", "device": info.device, "dtype": info.dtype,
         "backend": info.backend}
    )
    state.ready = True
    pipeline = Pipeline(settings, engine, metrics, state)
    pipeline.install_signal_handlers()
    try:
        return pipeline.run()
    finally:
        server.stop()
