"""poll -> parse -> fetch (thread pool) -> batch -> infer (one thread) -> publish -> commit.

The poll loop (main thread) never waits for the model. It parses each record, hands the image fetch
to a thread pool, and queues the event for the inference thread; when MAX_IN_FLIGHT events are
unpublished it pauses its partitions and keeps polling, so a batch longer than max.poll.interval.ms
costs no rebalance. The inference thread batches, generates, and publishes each batch through a
`Delivery` (consumer/delivery.py): at-least-once (an input offset is committed once the broker has
acknowledged its result or dead letter) or exactly-once (one transaction per batch). A failed
publish, or any unexpected error, stops the service without committing anything more: another
member then takes the partitions over from the last committed offset.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.delivery import Delivery, OutgoingRecord, fit_to_topic_limits, make_delivery, producer_config
from consumer.engine.base import Engine, Generation, GenerationRequest
from consumer.errors import FetchError, InferError, ProcessingError, PublishError
from consumer.events import DiagramEvent, DiagramResult, ResultMetadata, Source, event_id_hint, parse_event
from consumer.images import ImageResolver, LoadedImage
from consumer.logs import event_fields
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker, TopicPartitionKey
from consumer.settings import Settings

logger = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.5
POLL_TIMEOUT_S = 0.2
ERROR_LOG_INTERVAL_S = 30.0
"""librdkafka repeats a connection error every few milliseconds while a broker is down."""

EXIT_CLEAN = 0
"""Shutdown finished the batch in flight, published and committed it."""
EXIT_UNFINISHED = 1
"""Shutdown ran out of SHUTDOWN_TIMEOUT: unfinished work is left uncommitted, for the group to redo."""
EXIT_FAILED = 2
"""Stopped on an unrecoverable error (a publish failed, a worker crashed); nothing more was committed."""
EXIT_KILLED = 130
"""A second SIGTERM/SIGINT: exited at once, without a clean shutdown."""

# librdkafka's pause() drops the records it had prefetched, and fetching restarts about a second
# after resume(); pausing at every full window capped an ENGINE=echo replica near 135 events/s
# (bench/pipeline.py). So a full window first only stops taking records, which wait undecoded in
# librdkafka's bounded queue, and the partitions are paused once it has stayed full this long.
PAUSE_AFTER_S = 2.0
_STOP = object()


@dataclass
class WorkItem:
    """One input record between the poll loop and its published result or dead letter."""

    message: Message
    epoch: int
    event: DiagramEvent | None = None
    image: Future[LoadedImage] | None = None
    failure: ProcessingError | None = None  # refused before the model (unparseable): dead-lettered
    event_id: str | None = None
    polled_at: float = field(default_factory=time.monotonic)

    @property
    def tp(self) -> TopicPartitionKey:
        return (self.message.topic(), self.message.partition())

    def describe(self) -> str:
        return f"id={self.event_id} {self.message.topic()}[{self.message.partition()}]@{self.message.offset()}"


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
        self._producer_config = {**producer_config(settings), "error_cb": self._on_kafka_error}
        self._consumer_factory, self._producer_factory = consumer_factory, producer_factory
        self._work: queue.Queue = queue.Queue()
        self._fetch_pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="fetch")
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        self._paused: set[TopicPartitionKey] | None = None  # None: flowing; a set: the window is full
        self._full_since: float | None = None  # when the in-flight window last filled up
        self._error_logged: dict[int, float] = {}
        self.delivery: Delivery

    # -- lifecycle ---------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        if self._stop.is_set():
            logger.warning("second stop signal: exiting at once without a clean shutdown")
            os._exit(EXIT_KILLED)
        logger.info("stop requested: finishing the batch in flight (up to %.0f s)", self.settings.shutdown_timeout)
        self.state.stopping = True
        self._stop.set()
        self._work.put(_STOP)  # wake the inference thread if it is waiting for work

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def _fail(self, exc: BaseException) -> None:
        """Record the first unrecoverable error: the poll loop stops and nothing more is committed."""
        if self._fatal is None:
            self._fatal = exc

    def _failed(self) -> bool:
        return self._fatal is not None

    def run(self) -> int:
        """Consume until stopped. Returns the exit status (EXIT_CLEAN after a clean shutdown)."""
        self._producer_config = fit_to_topic_limits(
            self._producer_config, [self.settings.output_topic, self.settings.dlq_topic]
        )
        self.producer = self._producer_factory(self._producer_config)
        self.consumer = self._consumer_factory(self._consumer_config)
        self.delivery = make_delivery(
            self.settings, self.producer, self.consumer, self.tracker, self.metrics, self._fail, self._failed
        )
        worker = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        try:
            self.delivery.start(self._stop)
            worker.start()
            self.consumer.subscribe(
                [self.settings.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            logger.info(
                "consuming %s as group %s -> results %s, dead letters %s (%s)",
                self.settings.input_topic, self.settings.kafka_group_id, self.settings.output_topic,
                self.settings.dlq_topic, self.settings.processing_guarantee,
            )
            while not self._stop.is_set() and self._fatal is None:
                self._poll_once()
            return self._shutdown(worker)
        except BaseException as exc:  # noqa: BLE001 - any crash: commit nothing more
            self._fail(exc)
            logger.exception("poll loop failed; stopping without committing in-flight work")
            return self._abort(worker)

    def _poll_once(self) -> None:
        self.producer.poll(0)
        if self._full_since is not None and self._paused is None:
            message = None  # the window is full: take no record yet (see PAUSE_AFTER_S)
            self.producer.poll(0.05)  # wakes on the acknowledgement that frees a slot
        else:
            message = self.consumer.poll(POLL_TIMEOUT_S)
        self.state.last_poll = time.time()
        self.metrics.last_poll.set(self.state.last_poll)
        if message is not None:
            if message.error():
                self._on_message_error(message)
            else:
                self._on_message(message)
        self._flow_control()
        self.delivery.tick()

    def _shutdown(self, worker: threading.Thread) -> int:
        """Stop fetching, let the inference thread finish the batch it is generating (queued events
        are dropped, uncommitted, for the group to redo), publish and commit it, leave the group."""
        if self._fatal is not None:
            return self._abort(worker)
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self._pause_all()
        while worker.is_alive() and time.monotonic() < deadline and self._fatal is None:
            self.producer.poll(0.05)
            self.consumer.poll(0.05)  # keeps the membership; records are paused, and ignored if any
            self.delivery.tick()
        finished = not worker.is_alive()
        if not finished:
            logger.warning("the batch in flight did not finish within SHUTDOWN_TIMEOUT=%.0f s",
                           self.settings.shutdown_timeout)
        if self._fatal is None:
            published = self.delivery.close(deadline, self.state.broker_ok)
        if self._fatal is not None:
            return self._abort(worker)
        self.consumer.close()  # leaves the group now, so the partitions move without a session timeout
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        clean = finished and published
        logger.info("shutdown %s", "clean" if clean else "incomplete: unfinished work is left for the group")
        return EXIT_CLEAN if clean else EXIT_UNFINISHED

    def _abort(self, worker: threading.Thread) -> int:
        self._stop.set()
        self._work.put(_STOP)
        try:
            self.consumer.close()  # on_revoke commits nothing now: the group redoes uncommitted work
        except Exception:  # noqa: BLE001
            logger.exception("error while closing after a failure")
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        logger.error("stopped after an unrecoverable error, committing nothing more: %s", self._fatal)
        return EXIT_FAILED

    # -- polling -----------------------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        tp = (message.topic(), message.partition())
        epoch = self.tracker.add(tp, message.offset())
        if epoch is None:
            return  # the partition is being rewound: this record will be read again
        self.metrics.in_flight.set(self.tracker.in_flight())
        try:
            event = parse_event(message.value(), self.settings.max_event_bytes)
        except ProcessingError as error:
            self._work.put(WorkItem(message, epoch, failure=error, event_id=event_id_hint(message.value())))
            return
        image = self._fetch_pool.submit(self._resolve_image, event, message)
        self._work.put(WorkItem(message, epoch, event=event, image=image, event_id=event.id))

    def _resolve_image(self, event: DiagramEvent, message: Message) -> LoadedImage:
        """Fetch and decode, retrying transient fetch failures with backoff."""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                loaded = self.resolver.resolve(event.image)
                self.metrics.stage_seconds.labels("fetch").observe(loaded.fetch_seconds)
                self.metrics.stage_seconds.labels("decode").observe(loaded.decode_seconds)
                # Image preprocessing here, in parallel, keeps it off the single model thread.
                started = time.perf_counter()
                prepared = self.engine.prepare_image(loaded.image)
                self.metrics.stage_seconds.labels("prepare").observe(time.perf_counter() - started)
                return loaded.with_prepared(prepared)
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
        self._log_error("consumer error: %s", error)

    def _on_kafka_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            # Back to True when librdkafka's statistics show a broker up again (service.py). Not on
            # a single _TRANSPORT error: brokers close idle connections, and that is no outage.
            self.state.broker_ok = False
        if error.fatal():
            self._fail(KafkaException(error))
        self._log_error("kafka: %s", error)

    def _log_error(self, text: str, error: KafkaError) -> None:
        now = time.monotonic()
        if now - self._error_logged.get(error.code(), -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S:
            self._error_logged[error.code()] = now
            logger.warning(text, error)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for partition in partitions:
            self.tracker.assign((partition.topic, partition.partition))
        if partitions and self._paused is None:
            # librdkafka keeps a pause across unassign and assign (2.16, measured): a partition this
            # member paused in an earlier assignment would otherwise never be fetched again.
            consumer.resume([TopicPartition(p.topic, p.partition) for p in partitions])
        self.state.in_group = True
        self._refresh_assignment(consumer, extra=partitions)
        self.delivery.rebalanced()
        logger.info("assigned %s", [f"{p.topic}[{p.partition}]" for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget(tps, lost=False)  # what was published for them is committed first
        self._release_paused(consumer, tps)
        self._refresh_assignment(consumer, removed=tps)
        logger.info("revoked %s", [f"{t}[{p}]" for t, p in tps])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._forget(tps, lost=True)  # no commit: they already belong to someone else
        self._release_paused(consumer, tps)
        self._refresh_assignment(consumer, removed=tps)
        logger.warning("partitions lost: %s", [f"{t}[{p}]" for t, p in tps])

    def _forget(self, tps: list[TopicPartitionKey], lost: bool) -> None:
        """Drop the partitions' in-flight work, after the delivery kept what it may for them."""
        if self._fatal is not None:
            for tp in tps:
                self.tracker.revoke(tp)  # after an unhandled error nothing more is committed
            return
        with self.delivery.revoking(tps, self.state.broker_ok, lost=lost):
            for tp in tps:
                self.tracker.revoke(tp)

    def _release_paused(self, consumer: Consumer, tps: list[TopicPartitionKey]) -> None:
        """Resume partitions that leave while paused: the pause would outlive the assignment."""
        if self._paused is None:
            return
        leaving = self._paused & set(tps)
        if leaving:
            consumer.resume([TopicPartition(t, p) for t, p in leaving])
            self._paused -= leaving

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
            if self._paused is not None or time.monotonic() - self._full_since >= PAUSE_AFTER_S:
                self._pause_all()  # partitions assigned while the window is full wait too
            return
        self._full_since = None
        if self._paused is not None and not self._stop.is_set() and in_flight <= self.settings.max_in_flight // 2:
            self.consumer.resume([TopicPartition(t, p) for t, p in self._paused])
            self._paused = None
            self.state.paused = []
            self.metrics.paused_partitions.set(0)
        elif self._paused is not None:
            self._pause_all()  # partitions assigned while the window is full wait too

    def _pause_all(self) -> None:
        paused = self._paused or set()
        assignment = {(p.topic, p.partition) for p in self.consumer.assignment()}
        new = assignment - paused
        if new:
            self.consumer.pause([TopicPartition(t, p) for t, p in new])
        self._paused = paused | new
        self.state.paused = sorted(f"{t}[{p}]" for t, p in self._paused)
        self.metrics.paused_partitions.set(len(self._paused))

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self.delivery.on_commit(error, partitions)

    # -- inference thread --------------------------------------------------------------------------
    def _inference_loop(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._process_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - the poll loop must stop, committing nothing more
            logger.exception("inference thread failed; stopping without committing in-flight work")
            self._fail(exc)

    def _next_batch(self) -> list[WorkItem] | None:
        """The next batch, or None when stopping: queued events are then left uncommitted."""
        first = self._work.get()
        if first is _STOP or self._stop.is_set():
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
        return None if self._stop.is_set() else batch

    def _process_batch(self, batch: list[WorkItem]) -> None:
        records: list[OutgoingRecord] = []
        ready: list[tuple[WorkItem, LoadedImage]] = []
        for item in batch:
            if not self.tracker.is_current(item.tp, item.epoch):
                continue  # partition revoked or rewound: its owner processes the event again
            if item.failure is not None:
                records.append(self._dead_letter(item.message, item.epoch, item.failure, item.event_id))
                continue
            try:
                ready.append((item, item.image.result()))
            except ProcessingError as error:
                records.append(self._dead_letter(item.message, item.epoch, error, item.event_id))
            except CancelledError:
                continue  # shutting down: left uncommitted
        if ready:
            logger.info("generating a batch of %d: %s", len(ready), " ".join(item.describe() for item, _ in ready))
            records.extend(self._generate(ready))
        if records:
            self._publish(records)

    def _generate(self, ready: list[tuple[WorkItem, LoadedImage]]) -> list[OutgoingRecord]:
        """Results for a batch; if the batch fails, each event alone, so one bad event (a poison
        message) is dead-lettered and the others still get their results."""
        requests = [
            GenerationRequest(
                image=loaded.image, prompt=item.event.prompt or self.settings.prompt, prepared=loaded.prepared
            )
            for item, loaded in ready
        ]
        started = time.perf_counter()
        try:
            generations = self.engine.generate(requests)
        except Exception as exc:  # noqa: BLE001 - one bad image must not sink its batch
            if len(ready) > 1:
                logger.warning("batch of %d failed (%s); retrying one by one", len(ready), exc)
                return [record for pair in ready for record in self._generate([pair])]
            item = ready[0][0]
            error = InferError(f"model failed: {exc}", reason=type(exc).__name__)
            return [self._dead_letter(item.message, item.epoch, error, item.event_id)]
        generation_time = time.perf_counter() - started
        preprocess_time = min(self.engine.last_preprocess_seconds, generation_time)
        self.metrics.stage_seconds.labels("preprocess").observe(preprocess_time)
        self.metrics.stage_seconds.labels("generate").observe(generation_time - preprocess_time)
        self.metrics.batch_size.observe(len(ready))
        share = generation_time / len(ready)
        records = []
        for (item, loaded), generation in zip(ready, generations):
            self.metrics.generated_tokens.inc(generation.output_tokens)
            records.append(self._result(item, loaded, generation, share, len(ready)))
        return records

    # -- publishing --------------------------------------------------------------------------------
    def _publish(self, records: list[OutgoingRecord]) -> None:
        with self.delivery.batch() as send:
            for record in records:
                published = send(record)
                if published is record and record.outcome == "ok":
                    source = record.source
                    logger.info(
                        "described id=%s %s[%d]@%d in %.2f s (%d tokens, batch %d)",
                        record.event_id, source.topic(), source.partition(), source.offset(),
                        record.log_fields["inference_time"], record.log_fields["output_tokens"],
                        record.log_fields["batch_size"],
                        extra=event_fields(
                            record.event_id, source.topic(), source.partition(), source.offset(), "ok",
                            **record.log_fields,
                        ),
                    )

    def _result(
        self, item: WorkItem, loaded: LoadedImage, generation: Generation, generation_time: float, batch_size: int
    ) -> OutgoingRecord:
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

        def too_large(refused_by: str) -> OutgoingRecord:
            error = PublishError(f"result is {len(value)} bytes, more than {refused_by}", reason="too_large")
            return self._dead_letter(message, item.epoch, error, item.event.id)

        return OutgoingRecord(
            topic=self.settings.output_topic, key=message.key(), value=value, headers=None, source=message,
            epoch=item.epoch, outcome="ok", event_id=item.event.id, fallback=too_large,
            log_fields={
                "inference_time": result.metadata.inference_time, "generation_time": result.metadata.generation_time,
                "output_tokens": generation.output_tokens, "batch_size": batch_size,
            },
        )

    def _dead_letter(
        self, message: Message, epoch: int, error: ProcessingError, event_id: str | None
    ) -> OutgoingRecord:
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
        return self._dead_letter_record(message, epoch, headers, event_id, omit_value=oversized)

    def _dead_letter_record(
        self, message: Message, epoch: int, headers: dict[str, str], event_id: str | None, omit_value: bool
    ) -> OutgoingRecord:
        """The input's key and value with the error headers; a value too large to send is left out
        (header error.value_omitted), so an oversized record cannot stop the partition."""
        value = message.value()
        if omit_value and value is not None:
            headers = {**headers, "error.value_omitted": str(len(value))}
            value = None

        def without_value(_refused_by: str) -> OutgoingRecord:
            return self._dead_letter_record(message, epoch, headers, event_id, omit_value=True)

        return OutgoingRecord(
            topic=self.settings.dlq_topic, key=message.key(), value=value, headers=list(headers.items()),
            source=message, epoch=epoch, outcome="dead_lettered", event_id=event_id,
            fallback=without_value if value is not None else None,
        )
