"""`python -m consumer run`: load the model, start the side server, consume until stopped."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from confluent_kafka import Consumer, Producer

from consumer.engine.base import Engine, EngineLoadError
from consumer.infer import SharedEngine
from consumer.logs import kafka_client_logger
from consumer.metrics import Metrics
from consumer.pipeline import Pipeline, ServiceState
from consumer.server import SideServer, build_app
from consumer.settings import Settings

logger = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 3

# librdkafka statistics (consumer lag per partition, broker states) every this often, unless
# KAFKA_STATISTICS_INTERVAL_MS says otherwise. Emitting them costs one JSON document per interval.
STATS_INTERVAL_MS = 5000


def build_engine(settings: Settings) -> Engine:
    if settings.engine == "echo":
        from consumer.engine.echo import EchoEngine

        logger.warning(
            "ENGINE=echo: NO MODEL RUNS. Every description is the same fixed text, for pipeline benchmarks "
            "only; unset ENGINE to serve %s", settings.base_model_id,
        )
        return EchoEngine(delay_s=settings.echo_delay_ms / 1000)
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
    # The pipeline and POST /infer share one engine, and through it one model call at a time.
    shared = SharedEngine(engine, settings.batch_size or engine.info.default_batch_size)
    app = build_app(settings, engine.info, state, metrics, infer_engine=shared if settings.infer_endpoint else None)
    # The side server answers (503) while the model loads, so probes see a live, not-ready pod.
    server = SideServer(app, settings.http_host, settings.http_port)
    server.start()
    try:
        engine.load()
        if settings.debug_stall_file is not None:
            stall_while_exists(settings.debug_stall_file, "before the warm-up")
        engine.warm_up()
    except EngineLoadError as exc:
        logger.error("cannot start: %s", exc)
        server.stop()
        return EXIT_LOAD_FAILED
    if settings.batch_size is None:
        settings = settings.model_copy(update={"batch_size": engine.info.default_batch_size})
        shared.batch_size = settings.batch_size
        logger.info("BATCH_SIZE unset: %d, the default on %s", settings.batch_size, engine.info.device)
    metrics.record_engine(engine.info)
    state.ready = True
    pipeline = Pipeline(
        settings, shared, metrics, state,
        consumer_factory=observed_consumer_factory(settings, metrics, state),
        producer_factory=observed_producer_factory(),
    )
    pipeline.install_signal_handlers()
    try:
        return pipeline.run()
    finally:
        server.stop()


# -- Kafka clients with statistics and logs wired in ---------------------------------------------------
def observed_consumer_factory(settings: Settings, metrics: Metrics, state: ServiceState) -> Callable[[dict], Consumer]:
    """Consumers that report lag and broker state (librdkafka statistics) and log through `logging`."""

    def on_stats(document: str) -> None:
        try:
            stats = json.loads(document)
        except ValueError:
            logger.debug("unreadable librdkafka statistics", exc_info=True)
            return
        metrics.observe_consumer_stats(stats)
        # error_cb marks the broker down when no broker answers; statistics say when it is back,
        # even while no message arrives to prove it.
        state.broker_ok = any(broker.get("state") == "UP" for broker in stats.get("brokers", {}).values())

    def build(config: dict[str, Any]) -> Consumer:
        config = {
            "statistics.interval.ms": STATS_INTERVAL_MS,
            **config,
            "stats_cb": on_stats,
            "logger": kafka_client_logger("librdkafka.consumer"),
        }
        if settings.debug_stall_file is not None:
            return StallingConsumer(config, settings.debug_stall_file)
        return Consumer(config)

    return build


def observed_producer_factory() -> Callable[[dict], Producer]:
    return lambda config: Producer({**config, "logger": kafka_client_logger("librdkafka.producer")})


# -- fault injection (DEBUG_STALL_FILE) -------------------------------------------------------------
def stall_while_exists(path: Path, where: str) -> None:
    """Stand still while `path` exists: the honest picture of a thread stuck in a call."""
    if path.exists():
        logger.warning("DEBUG_STALL_FILE %s exists: stalling %s until it is removed", path, where)
        while path.exists():
            time.sleep(0.05)
        logger.warning("DEBUG_STALL_FILE removed: going on")


class StallingConsumer(Consumer):
    """A consumer whose `poll` stands still while DEBUG_STALL_FILE exists (tests of /health/live).

    The pipeline's loop is then really stuck where a hung poll would leave it, and the side server,
    on its own thread, has to notice from the outside.
    """

    def __init__(self, config: dict[str, Any], stall_file: Path) -> None:
        super().__init__(config)
        self._stall_file = stall_file

    def poll(self, timeout: float = -1):  # type: ignore[override]
        stall_while_exists(self._stall_file, "the poll loop")
        return super().poll(timeout)
