"""poll -> parse -> fetch (thread pool) -> batch -> infer (one thread) -> produce -> commit.

The poll loop never waits for the model. It parses each record, hands the image fetch to a thread
pool, and queues the event for the inference thread; when MAX_IN_FLIGHT events are unpublished it
pauses its partitions and keeps polling, so a slow batch never costs a rebalance. An input offset is
committed only once the broker has acknowledged the event's result or dead letter
(`OffsetTracker`). A failed publish, or any unexpected error, stops the service without committing
anything more: another member then takes the partitions over from the last committed offset.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.engine.base import Engine, GenerationRequest
from consumer.errors import FetchError, InferError, ProcessingError, PublishError
from consumer.events import DiagramEvent, DiagramResult, ResultMetadata, Source, event_id_hint, parse_event
from consumer.images import ImageResolver, LoadedImage
from consumer.logs import event_fields
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings

logger = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.5
COMMIT_INTERVAL_S = 0.5
# librdkafka's pause() drops the records it had prefetched, and fetching restarts about a second
# after resume(); pausing at every full window capped an ENGINE=echo replica near 135 events/s
# (bench/pipeline.py). So a full window first only stops taking records, which wait undecoded in
# librdkafka's bounded queue, and the partitions are paused once it has stayed full this long.
PAUSE_AFTER_S = 2.0
_STOP = object()


@dataclass
class WorkItem:
    """One event between the poll loop and its published result."""

    message: Message
    event: DiagramEvent
    epoch: int
    image: Future[LoadedImage]
    polled_at: float = field(default_factory=time.monotonic)

    @property
    def tp(self) -> tuple[str, int]:
        return (self.message.topic(), self.message.partition())

    def describe(self) -> str:
        return f"id={self.event.id} {self.message.topic()}[{self.message.partition()}]@{self.message.offset()}"


@dataclass
class ServiceState:
    """What /health reports; written by the pipeline, read by the side server."""

    started_at: float = field(default_factory=time.time)
    ready: bool = False
    in_group: bool = False
    broker_ok: bool = True
    last_poll: float = 0.0
    assigned: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    stopping: bool = False


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        state: ServiceState | None = None,
        consumer_factory: Callable[[dict], Consumer] = Consumer,
        producer_factory: Callable[[dict], Producer] = Producer,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.state = state or ServiceState()
        self.resolver = ImageResolver(settings)
        self.tracker = OffsetTracker()
        self._consumer_config = {
            **settings.consumer_config(),
            "on_commit": self._on_commit,
            "error_cb": self._on_kafka_error,
        }
        self._producer_config = {**settings.producer_config(), "error_cb": self._on_kafka_error}
        self._consumer_factory, self._producer_factory = consumer_factory, producer_factory
        self._work: queue.Queue = queue.Queue()
        self._fetch_pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="fetch")
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        self._paused = False
        self._full_since: float | None = None
        self._last_commit = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        if self._stop.is_set():
            logger.warning("second stop signal: exiting at once without a clean shutdown")
            import os

            os._exit(130)
        logger.info("stop requested: finishing in-flight work (up to %.0f s)", self.settings.shutdown_timeout)
        self.state.stopping = True
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        """Consume until stopped. Returns the exit status: 0 after a clean shutdown."""
        self.producer = self._producer_factory(self._producer_config)
        self.consumer = self._consumer_factory(self._consumer_config)
        worker = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        worker.start()
        self.consumer.subscribe(
            [self.settings.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        logger.info(
            "consuming %s as group %s -> results %s, dead letters %s",
            self.settings.input_topic, self.settings.kafka_group_id, self.settings.output_topic, self.settings.dlq_topic,
        )
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._poll_once()
            return self._shutdown(worker)
        except BaseException as exc:  # noqa: BLE001 - any crash: commit nothing more
            self._fatal = self._fatal or exc
            logger.exception("poll loop failed; stopping without committing in-flight work")
            return self._abort(worker)

    def _poll_once(self) -> None:
        self.producer.poll(0)
        if self._full_since is not None and not self._paused:
            message = None
            self.producer.poll(0.05)  # wakes on the acknowledgement that frees a slot
        else:
            message = self.consumer.poll(0.2)
        self.state.last_poll = time.time()
        self.metrics.last_poll.set(self.state.last_poll)
        if message is not None:
            if message.error():
                self._on_message_error(message)
            else:
                self.state.broker_ok = True
                self._on_message(message)
        self._flow_control()
        self._commit_due()

    def _shutdown(self, worker: threading.Thread) -> int:
        if self._fatal is not None:
            return self._abort(worker)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self._pause_all()
        while self.tracker.in_flight() and time.monotonic() < deadline and self._fatal is None:
            self.producer.poll(0.05)
            self.consumer.poll(0.05)
        self._work.put(_STOP)
        remaining = max(deadline - time.monotonic(), 0.1)
        self.producer.flush(remaining)
        worker.join(timeout=1.0)
        clean = self.tracker.in_flight() == 0 and self._fatal is None
        if self._fatal is None:
            self._commit(force=True)
        self.consumer.close()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        logger.info("shutdown %s", "clean" if clean else f"incomplete: {self.tracker.in_flight()} events unfinished")
        return 0 if clean else 1

    def _abort(self, worker: threading.Thread) -> int:
        self._work.put(_STOP)
        try:
            self.producer.flush(5.0)
            self.consumer.close()
        except Exception:  # noqa: BLE001
            logger.exception("error while closing after a failure")
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        logger.error("stopped after an unrecoverable error: %s", self._fatal)
        return 2

    # -- polling -----------------------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        tp = (message.topic(), message.partition())
        epoch = self.tracker.add(tp, message.offset())
        self.metrics.in_flight.set(self.tracker.in_flight())
        try:
            event = parse_event(message.value(), self.settings.max_event_bytes)
        except ProcessingError as error:
            self._dead_letter(message, error, epoch, event_id_hint(message.value()))
            return
        image = self._fetch_pool.submit(self._resolve_image, event, message)
        self._work.put(WorkItem(message=message, event=event, epoch=epoch, image=image))

    def _resolve_image(self, event: DiagramEvent, message: Message) -> LoadedImage:
        """Fetch and decode, retrying transient fetch failures with backoff."""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                loaded = self.resolver.resolve(event.image)
                self.metrics.stage_seconds.labels("fetch").observe(loaded.fetch_seconds)
                self.metrics.stage_seconds.labels("decode").observe(loaded.decode_seconds)
                return loaded
            except FetchError as error:
                error.attempts = attempt
                if not error.retryable or attempt == FETCH_ATTEMPTS:
                    raise
                self.metrics.events.labels("retried").inc()
                logger.info("retrying fetch for id=%s after %s (attempt %d)", event.id, error.message, attempt)
                time.sleep(FETCH_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _on_message_error(self, message: Message) -> None:
        error = message.error()
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        logger.warning("consumer error: %s", error)

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.state.broker_ok = False
        if error.fatal():
            self._fatal = KafkaException(error)
        logger.warning("kafka: %s", error)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self.tracker.assign((partition.topic, partition.partition))
        self.state.in_group = True
        if self._paused and partitions:
            consumer.pause(partitions)  # the window is full: new partitions wait too
        self._refresh_assignment(consumer, extra=partitions)
        logger.info("assigned %s", [f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        if self._fatal is None:
            self._commit(force=True, tps=tps)  # what was published for them is kept
        for tp in tps:
            self.tracker.revoke(tp)
        self._refresh_assignment(consumer, removed=tps)
        logger.info("revoked %s", [f"{t}[{p}]" for t, p in tps])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self.tracker.revoke((partition.topic, partition.partition))  # no commit: we no longer own them
        self._refresh_assignment(consumer, removed=[(p.topic, p.partition) for p in partitions])
        logger.warning("partitions lost: %s", [f"{p.topic}[{p.partition}]" for p in partitions])

    def _refresh_assignment(self, consumer: Consumer, extra=(), removed=()) -> None:
        current = {(p.topic, p.partition) for p in consumer.assignment()} | {(p.topic, p.partition) for p in extra}
        current -= set(removed)
        self.state.assigned = sorted(f"{t}[{p}]" for t, p in current)
        self.metrics.assigned_partitions.set(len(current))

    def _flow_control(self) -> None:
        in_flight = self.tracker.in_flight()
        self.metrics.in_flight.set(in_flight)
        if in_flight >= self.settings.max_in_flight:
            self._full_since = self._full_since or time.monotonic()
            if not self._paused and time.monotonic() - self._full_since >= PAUSE_AFTER_S:
                self._pause_all()
            return
        self._full_since = None
        if self._paused and not self._stop.is_set() and in_flight <= self.settings.max_in_flight // 2:
            assignment = self.consumer.assignment()
            self.consumer.resume(assignment)
            self._paused = False
            self.state.paused = []
            self.metrics.paused_partitions.set(0)

    def _pause_all(self) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)
        self._paused = True
        self.state.paused = sorted(f"{p.topic}[{p.partition}]" for p in assignment)
        self.metrics.paused_partitions.set(len(assignment))

    # -- committing --------------------------------------------------------------------------------
    def _commit_due(self) -> None:
        if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            self._commit()

    def _commit(self, force: bool = False, tps: list[tuple[str, int]] | None = None) -> None:
        self._last_commit = time.monotonic()
        points = self.tracker.commit_points(tps)
        if not points:
            return
        offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in points.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            logger.warning("commit failed (will retry): %s", exc)
            return
        self.tracker.mark_committed(points)
        for (topic, partition), offset in points.items():
            self.metrics.committed_offset.labels(topic, str(partition)).set(offset)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            logger.warning("offset commit error: %s", error)

    # -- inference thread --------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._process_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - the poll loop must stop, committing nothing more
            logger.exception("inference thread failed")
            self._fatal = exc

    def _next_batch(self) -> list[WorkItem] | None:
        first = self._work.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000
        while len(batch) < self.settings.batch_size:
            try:
                item = self._work.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is _STOP:
                self._work.put(_STOP)
                break
            batch.append(item)
        return batch

    def _process_batch(self, batch: list[WorkItem]) -> None:
        ready: list[tuple[WorkItem, LoadedImage]] = []
        for item in batch:
            if not self.tracker.is_current(item.tp, item.epoch):
                continue  # partition revoked: its new owner processes the event again
            try:
                ready.append((item, item.image.result()))
            except ProcessingError as error:
                self._dead_letter(item.message, error, item.epoch, item.event.id)
        if ready:
            self._generate_and_publish(ready)

    def _generate_and_publish(self, ready: list[tuple[WorkItem, LoadedImage]]) -> None:
        requests = [
            GenerationRequest(image=loaded.image, prompt=item.event.prompt or self.settings.prompt)
            for item, loaded in ready
        ]
        started = time.perf_counter()
        try:
            generations = self.engine.generate(requests)
        except Exception as exc:  # noqa: BLE001 - one bad image must not sink its batch
            if len(ready) > 1:
                logger.warning("batch of %d failed (%s); retrying one by one", len(ready), exc)
                for pair in ready:
                    self._generate_and_publish([pair])
                return
            item = ready[0][0]
            error = InferError(f"model failed: {exc}", reason=type(exc).__name__)
            self._dead_letter(item.message, error, item.epoch, item.event.id)
            return
        generation_time = time.perf_counter() - started
        preprocess_time = min(self.engine.last_preprocess_seconds, generation_time)
        self.metrics.stage_seconds.labels("preprocess").observe(preprocess_time)
        self.metrics.stage_seconds.labels("generate").observe(generation_time - preprocess_time)
        self.metrics.batch_size.observe(len(ready))
        share = generation_time / len(ready)
        for (item, loaded), generation in zip(ready, generations):
            self.metrics.generated_tokens.inc(generation.output_tokens)
            self._publish_result(item, loaded, generation, share, len(ready))

    # -- publishing --------------------------------------------------------------------------------
    def _publish_result(self, item: WorkItem, loaded: LoadedImage, generation, generation_time: float, batch_size: int) -> None:
        info = self.engine.info
        message = item.message
        result = DiagramResult(
            id=item.event.id,
            description=generation.text,
            metadata=ResultMetadata(
                inference_time=round(time.monotonic() - item.polled_at, 4),
                generation_time=round(generation_time, 4),
                image_size=loaded.size,
                model=info.model,
                adapter=info.adapter,
                device=info.device,
                output_tokens=generation.output_tokens,
                batch_size=batch_size,
                source=Source(topic=message.topic(), partition=message.partition(), offset=message.offset()),
            ),
            input_metadata=item.event.metadata,
        )
        value = result.model_dump_json().encode()

        def too_large_for_broker() -> None:
            error = PublishError(
                f"result is {len(value)} bytes, larger than {self.settings.output_topic} accepts (max.message.bytes)",
                reason="too_large",
            )
            self._dead_letter(message, error, item.epoch, item.event.id)

        on_delivery = self._delivery_handler(item.message, item.epoch, item.event.id, "ok", too_large_for_broker)
        try:
            self.producer.produce(self.settings.output_topic, value=value, key=message.key(), on_delivery=on_delivery)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                error = PublishError(
                    f"result is {len(value)} bytes, larger than the producer's message.max.bytes", reason="too_large"
                )
                self._dead_letter(message, error, item.epoch, item.event.id)
                return
            raise
        except BufferError:
            self.producer.flush(1.0)
            self.producer.produce(self.settings.output_topic, value=value, key=message.key(), on_delivery=on_delivery)
        logger.info(
            "described %s in %.2f s (%d tokens, batch %d)",
            item.describe(), result.metadata.inference_time, generation.output_tokens, batch_size,
            extra=event_fields(
                item.event.id, message.topic(), message.partition(), message.offset(), "ok",
                inference_time=result.metadata.inference_time, generation_time=result.metadata.generation_time,
                output_tokens=generation.output_tokens, batch_size=batch_size,
            ),
        )

    def _dead_letter(self, message: Message, error: ProcessingError, epoch: int, event_id: str | None) -> None:
        headers = {
            "error.stage": error.stage,
            "error.class": type(error).__name__,
            "error.message": error.message[:2000],
            "error.reason": error.reason,
            "error.attempts": str(error.attempts),
            "source.topic": message.topic(),
            "source.partition": str(message.partition()),
            "source.offset": str(message.offset()),
        }
        if event_id is not None:
            headers["event.id"] = event_id
        self.metrics.failures.labels(error.stage, error.reason).inc()
        logger.warning(
            "dead-lettering id=%s %s[%d]@%d: %s failed (%s): %s",
            event_id, message.topic(), message.partition(), message.offset(), error.stage, error.reason, error.message,
            extra=event_fields(
                event_id, message.topic(), message.partition(), message.offset(), "dead_lettered",
                stage=error.stage, reason=error.reason, attempts=error.attempts,
            ),
        )
        oversized = len(message.value() or b"") > self.settings.max_event_bytes
        self._produce_dead_letter(message, headers, epoch, event_id, omit_value=oversized)

    def _produce_dead_letter(
        self, message: Message, headers: dict[str, str], epoch: int, event_id: str | None, omit_value: bool
    ) -> None:
        """The input's key and value with the error headers; a value too large to send is left out
        (header error.value_omitted), so an oversized record cannot stop the partition."""
        value = message.value()
        if omit_value and value is not None:
            headers = {**headers, "error.value_omitted": str(len(value))}
            value = None

        def without_value() -> None:
            self._produce_dead_letter(message, headers, epoch, event_id, omit_value=True)

        retry = without_value if value is not None else None
        try:
            self.producer.produce(
                self.settings.dlq_topic,
                key=message.key(),
                value=value,
                headers=list(headers.items()),
                on_delivery=self._delivery_handler(message, epoch, event_id, "dead_lettered", retry),
            )
        except KafkaException as exc:
            if retry is not None and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                retry()
                return
            raise

    def _delivery_handler(
        self, source: Message, epoch: int, event_id: str | None, outcome: str,
        on_too_large: Callable[[], None] | None = None,
    ):
        tp = (source.topic(), source.partition())
        offset, timestamp = source.offset(), source.timestamp()[1]
        produced_at = time.monotonic()  # the handler is made just before its produce() call

        def on_delivery(error: KafkaError | None, _record: Message) -> None:
            if error is not None and on_too_large is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                logger.warning("broker refused %s for %s[%d]@%d as too large", outcome, tp[0], tp[1], offset)
                on_too_large()  # the input is settled by what this produces instead
                return
            if error is not None:
                # The producer already retried for message.timeout.ms: this input must not be
                # committed, and this member must stop so another one takes the partition over.
                logger.error("could not publish %s for %s[%d]@%d: %s", outcome, tp[0], tp[1], offset, error)
                self._fatal = KafkaException(error)
                return
            self.tracker.done(tp, offset, epoch)
            self.metrics.events.labels(outcome).inc()
            self.metrics.stage_seconds.labels("publish").observe(time.monotonic() - produced_at)
            if timestamp > 0:
                self.metrics.stage_seconds.labels("end_to_end").observe(max(time.time() - timestamp / 1000, 0))

        return on_delivery

