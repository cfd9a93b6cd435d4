"""Resolve: each record parsed, its image fetched, decoded and prepared for the model on a thread pool.

`submit` refuses a record while MAX_IN_FLIGHT events are unpublished (the window intake pauses on). A
record that is not a valid event goes on as a failure, to be dead-lettered; a valid one goes on at
once with its image as a future, so the inference stage can batch it while the image is still being
fetched. Transient fetch failures (timeouts, 5xx and 429 answers, connection resets) are tried up to
FETCH_ATTEMPTS times with backoff.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from consumer.engine.base import Generator
from consumer.errors import FetchError, ProcessingError
from consumer.events import DiagramEvent, event_id_hint, parse_event
from consumer.images import ImageResolver, LoadedImage
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages.base import InputRecord, MessageRejected, Stage, WorkItem

logger = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.5


class Resolve:
    def __init__(
        self,
        settings: Settings,
        tracker: OffsetTracker,
        resolver: ImageResolver,
        generator: Generator,
        metrics: Metrics,
        next_stage: Stage[WorkItem],
    ) -> None:
        self.settings, self.tracker, self.resolver = settings, tracker, resolver
        self.generator, self.metrics, self.next = generator, metrics, next_stage
        self._pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="fetch")

    def submit(self, record: InputRecord) -> None:
        if self.tracker.in_flight() >= self.settings.max_in_flight:
            raise MessageRejected
        epoch = self.tracker.add(record.tp, record.offset)
        if epoch is None:
            return  # the partition is being rewound: this record will be read again
        self.metrics.in_flight.set(self.tracker.in_flight())
        try:
            event = parse_event(record.value, self.settings.max_event_bytes)
        except ProcessingError as error:
            self.next.submit(WorkItem(record, epoch, failure=error, event_id=event_id_hint(record.value)))
            return
        image = self._pool.submit(self._resolve_image, event)
        self.next.submit(WorkItem(record, epoch, event=event, image=image, event_id=event.id))

    def _resolve_image(self, event: DiagramEvent) -> LoadedImage:
        """Fetch and decode, retrying transient fetch failures with backoff; then the model's preprocessing."""
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                loaded = self.resolver.resolve(event.image)
                self.metrics.stage_seconds.labels("fetch").observe(loaded.fetch_seconds)
                self.metrics.stage_seconds.labels("decode").observe(loaded.decode_seconds)
                # Image preprocessing here, in parallel, keeps it off the single model thread.
                started = time.perf_counter()
                assert loaded.image is not None  # just decoded
                prepared = self.generator.prepare_image(loaded.image)
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

    def poll(self, timeout: float = 0.0) -> None:
        self.next.poll(timeout)

    def join(self, timeout: float) -> bool:
        return self.next.join(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.next.close()
