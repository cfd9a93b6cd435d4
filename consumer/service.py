"""`python -m consumer run`: load the model, start the side server, consume until stopped."""

from __future__ import annotations

import logging

from consumer.clients import observed_consumer_factory, observed_producer_factory
from consumer.engine.base import Engine, EngineLoadError, ServesAdapters
from consumer.engine.reload import AdapterWatcher
from consumer.engine.shared import SharedEngine
from consumer.errors import ExitCode
from consumer.hooks import run_test_hook
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline
from consumer.result_cache.key import ResultKeyer
from consumer.result_cache.step import ResultStep
from consumer.result_cache.store import ResultCache
from consumer.result_cache.topic import CacheFollower, CacheTopicError, ensure_cache_topic
from consumer.settings import Settings
from consumer.state import ServiceState
from consumer.tracing import tracing_from_environ
from consumer.web.server import SideServer, build_app

logger = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "echo":
        from consumer.engine.echo import EchoEngine

        logger.warning(
            "ENGINE=echo: NO MODEL RUNS. Every description is the same fixed text, for pipeline benchmarks "
            "only; unset ENGINE to serve %s",
            settings.base_model_id,
        )
        return EchoEngine(delay_s=settings.echo_delay_ms / 1000)
    from consumer.engine.qwen import QwenVLEngine

    return QwenVLEngine(settings)


def watch_adapters(settings: Settings, engine: Engine, metrics: Metrics) -> AdapterWatcher | None:
    """Report each adapter's content, and with ADAPTER_POLL_SECONDS watch it for new content."""
    if not isinstance(engine, ServesAdapters):
        return None
    for name in settings.adapter_paths():
        metrics.record_adapter(name, engine.adapter_version(name).hash)
    if not settings.adapter_poll_seconds:
        return None
    return AdapterWatcher(engine, settings.adapter_paths(), settings.adapter_poll_seconds, metrics).start()


def run_service(settings: Settings) -> int:
    logger.info(
        "starting: model=%s adapter=%s device=%s dtype=%s kafka=%s",
        settings.base_model_id,
        settings.adapter_path,
        settings.device,
        settings.torch_dtype,
        settings.redacted_kafka_config(),
    )
    run_test_hook(settings)
    metrics = Metrics()
    state = ServiceState(model=settings.base_model_id)
    # The side server answers (503) while the model loads, so probes see a live, not-ready pod.
    server = SideServer(build_app(settings, state, metrics), settings.http_host, settings.http_port)
    server.start()
    engine = build_engine(settings)
    try:
        state.engine = engine.load()
        state.warmup_time = engine.warm_up()
    except EngineLoadError as exc:
        logger.error("cannot start: %s", exc)
        server.stop()
        return ExitCode.LOAD_FAILED
    info = state.engine
    batch_size = settings.batch_size or info.default_batch_size
    if settings.batch_size is None:
        logger.info("BATCH_SIZE unset: %d, the default on %s", batch_size, info.device)
    metrics.record_engine(info, state.warmup_time)
    keyer = ResultKeyer.for_engine(settings, info)
    watcher = watch_adapters(settings, engine, metrics)
    cache, follower = None, None
    if settings.result_cache_topic:
        try:
            ensure_cache_topic(settings)
        except CacheTopicError as exc:
            logger.error("cannot start: %s", exc)
            server.stop()
            return ExitCode.FAILED
        cache = ResultCache(settings.result_cache_max_bytes, metrics)
        follower = CacheFollower(settings, cache).start()
        if not follower.wait_loaded(settings.result_cache_load_timeout):
            logger.warning(
                "the result cache topic %s was not read to its end within RESULT_CACHE_LOAD_TIMEOUT=%.0f s: "
                "ready with %d entries, the rest is read while running",
                settings.result_cache_topic,
                settings.result_cache_load_timeout,
                cache.entries,
            )
    tracing = tracing_from_environ(settings)
    # The pipeline and POST /infer share one engine, and through it one model call at a time.
    shared = SharedEngine(engine, batch_size)
    pipeline = Pipeline(
        settings,
        shared,
        info,
        batch_size,
        metrics,
        state,
        consumer_factory=observed_consumer_factory(metrics, state),
        producer_factory=observed_producer_factory(),
        tracing=tracing,
        results=ResultStep(
            settings, keyer, info, cache, engine.adapter_version if isinstance(engine, ServesAdapters) else None
        ),
    )
    state.shared_engine = shared
    state.ready = True
    pipeline.install_signal_handlers()
    try:
        return pipeline.run()
    finally:
        if watcher is not None:
            watcher.stop()
        if follower is not None:
            follower.stop()
        tracing.shutdown()
        server.stop()
