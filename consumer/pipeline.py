"""The pipeline's wiring and lifecycle: the stages built, run, and stopped.

    intake ─> resolve ─> infer ─> records ─> delivery          (consumer/stages/)

The poll loop (main thread) runs intake, which never waits for the model; resolve fetches images on a
thread pool; infer batches and generates on its own thread and hands each batch's outcomes through
records to delivery (at-least-once, or exactly-once with one transaction per batch). A failed publish,
or any unexpected error in any thread, trips one `FatalLatch`: nothing more is committed, the
replica leaves the group and exits, and another member takes its partitions over from the last
committed offset.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from consumer.clients import (
    ConsumerFactory,
    KafkaErrors,
    ProducerFactory,
    RetryTopicsMissing,
    ensure_retry_topics,
    fit_to_topic_limits,
    producer_config,
)
from consumer.engine.base import EngineInfo, Generator
from consumer.errors import ExitCode
from consumer.images import ImageResolver
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages.base import FatalLatch
from consumer.stages.delivery import Delivery, make_delivery
from consumer.stages.infer import Infer
from consumer.stages.intake import Intake
from consumer.stages.records import Records
from consumer.stages.resolve import Resolve
from consumer.state import ServiceState
from consumer.tracing import NO_TRACING, Tracing

if TYPE_CHECKING:
    from consumer.result_cache.step import ResultStep

logger = logging.getLogger(__name__)
LEAVE_GROUP_S = 6.0
"""How long a shutdown waits for the consumer to close: librdkafka gives its LeaveGroup request 5 s."""


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        generator: Generator,
        engine: EngineInfo,
        batch_size: int,
        metrics: Metrics,
        state: ServiceState,
        consumer_factory: ConsumerFactory = Consumer,
        producer_factory: ProducerFactory = Producer,
        tracing: Tracing = NO_TRACING,
        results: ResultStep | None = None,
    ) -> None:
        self.settings, self.generator, self.engine, self.batch_size = settings, generator, engine, batch_size
        self.tracing, self.results = tracing, results
        self.metrics, self.state = metrics, state
        self._consumer_factory, self._producer_factory = consumer_factory, producer_factory
        self.latch = FatalLatch()
        self.tracker = OffsetTracker()
        self._stop = threading.Event()
        self._built = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        if self._stop.is_set():
            logger.warning("second stop signal: exiting at once without a clean shutdown")
            os._exit(ExitCode.KILLED)
        logger.info("stop requested: finishing the batch in flight (up to %.0f s)", self.settings.shutdown_timeout)
        self.state.stopping = True
        self._stop.set()
        if self._built:
            self.infer.join(0)  # start no new batch

    def install_signal_handlers(self) -> None:
        def handler(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _build(self) -> None:
        settings = self.settings
        errors = KafkaErrors(self.state, self.latch)
        ensure_retry_topics(settings, producer_config(settings))
        self.metrics.deferred_topics = frozenset(settings.retry_topics())
        topics = [settings.output_topic, settings.dlq_topic, *settings.retry_topics()]
        topics += [settings.result_cache_topic] if settings.result_cache_topic else []
        config = fit_to_topic_limits(producer_config(settings), topics)
        self.producer = self._producer_factory({**config, "error_cb": errors})
        self.consumer = self._consumer_factory(
            {
                **settings.consumer_config(),
                "on_commit": self._on_commit,
                "error_cb": errors,
            }
        )
        self.delivery: Delivery = make_delivery(
            settings, self.producer, self.consumer, self.tracker, self.metrics, self.latch, self.state
        )
        records = Records(settings, self.engine, self.metrics, self.delivery, tracing=self.tracing)
        self.infer = Infer(
            settings,
            self.batch_size,
            self.tracker,
            self.generator,
            self.metrics,
            self.latch,
            records,
            results=self.results,
            tracing=self.tracing,
        )
        self.resolve = Resolve(
            settings,
            self.tracker,
            ImageResolver(settings),
            self.generator,
            self.metrics,
            self.infer,
            tracing=self.tracing,
        )
        self.intake = Intake(
            settings,
            self.consumer,
            self.tracker,
            self.state,
            self.metrics,
            self.latch,
            errors,
            self.delivery,
            self.resolve,
        )
        self._built = True

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self.delivery.on_commit(error, partitions)

    def run(self) -> int:
        """Consume until stopped. Returns the exit status (ExitCode.CLEAN after a clean shutdown)."""
        try:
            self._build()
        except RetryTopicsMissing as exc:
            logger.error("cannot start: %s", exc)
            return ExitCode.FAILED
        try:
            self.delivery.start(self._stop)
            self.infer.start()
            self.intake.subscribe(self.settings.input_topic, *self.settings.retry_topics())
            logger.info(
                "consuming %s as group %s -> results %s, dead letters %s (%s)%s",
                self.settings.input_topic,
                self.settings.kafka_group_id,
                self.settings.output_topic,
                self.settings.dlq_topic,
                self.settings.processing_guarantee,
                f", retries through {self.settings.retry_topics()}" if self.settings.retry_delays else "",
            )
            while not self._stop.is_set() and not self.latch.tripped():
                self.intake.poll_once()
            return self._shutdown()
        except BaseException as exc:  # noqa: BLE001 - any crash: commit nothing more
            self.latch.trip(exc)
            logger.exception("poll loop failed; stopping without committing in-flight work")
            return self._abort()

    def _shutdown(self) -> int:
        """Stop fetching, let infer finish the batch it is generating (queued events are dropped,
        uncommitted, for the group to redo), publish and commit it, leave the group."""
        if self.latch.tripped():
            return self._abort()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.intake.pause_all()
        finished = self.infer.join(0)
        while not finished and time.monotonic() < deadline and not self.latch.tripped():
            self.intake.keep_membership()
            finished = self.infer.join(0)
        if not finished:
            logger.warning(
                "the batch in flight did not finish within SHUTDOWN_TIMEOUT=%.0f s", self.settings.shutdown_timeout
            )
        published = not self.latch.tripped() and self.delivery.join(
            deadline - time.monotonic(), between=self.intake.keep_membership
        )
        if self.latch.tripped():
            return self._abort()
        left_group = self._leave_group()
        self.resolve.close()
        clean = finished and published and left_group
        logger.info("shutdown %s", "clean" if clean else "incomplete: unfinished work is left for the group")
        return ExitCode.CLEAN if clean else ExitCode.UNFINISHED

    def _leave_group(self) -> bool:
        """Close the consumer: it leaves the group now, so the partitions move without a session timeout.

        librdkafka's close waits for requests still in flight, an offset commit's for up to
        socket.timeout.ms when the broker stopped answering; the shutdown waits LEAVE_GROUP_S for it,
        then goes on without it (the close keeps running in its own thread until the process ends).
        """
        closing = threading.Thread(target=self.consumer.close, name="leave-group", daemon=True)
        closing.start()
        closing.join(LEAVE_GROUP_S)
        if closing.is_alive():
            logger.warning("leaving the group took over %.0f s (broker not answering): exit without it", LEAVE_GROUP_S)
            return False
        return True

    def _abort(self) -> int:
        self._stop.set()
        self.infer.close()
        try:
            self.consumer.close()  # on_revoke commits nothing now: the group redoes uncommitted work
        except Exception:  # noqa: BLE001
            logger.exception("error while closing after a failure")
        self.resolve.close()
        logger.error("stopped after an unrecoverable error, committing nothing more: %s", self.latch.error)
        return ExitCode.FAILED
