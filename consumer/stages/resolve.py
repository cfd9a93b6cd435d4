"""Resolve: each record parsed, its image fetched, decoded and prepared for the model on a thread pool.

`submit` refuses a record while MAX_IN_FLIGHT events, or MAX_IN_FLIGHT_BYTES of input records, are
unpublished (the window intake pauses on). A record that is not a valid event goes on as a failure, to
be dead-lettered; a valid one goes on at once with its image as a future, so the inference stage can
batch it while the image is still being fetched. Transient fetch failures (timeouts, 5xx and 429
answers, connection resets) are tried up to FETCH_ATTEMPTS times with backoff, or once when RETRY_DELAYS
is set (the event then hops through the retry topics instead: consumer/stages/retry.py). Whatever goes wrong
with one event, foreseen or not, ends as a `ProcessingError` of the stage it happened in (parse,
fetch, decode, prepare), never as an exception that would stop the replica. Work queued for a
partition that has been revoked (or rewound) since is skipped when its turn comes.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

from consumer.engine.base import Generator
from consumer.errors import DecodeError, FetchError, ParseError, PrepareError, ProcessingError
from consumer.events import DiagramEvent, check_adapter, event_id_hint, parse_event
from consumer.images import ImageResolver, LoadedImage
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.result_cache.key import content_hash
from consumer.settings import Settings
from consumer.stages.base import InputRecord, MessageRejected, Stage, WorkItem
from consumer.tracing import NO_TRACING, Tracing

logger = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
"""In-process attempts of a transiently failing fetch without RETRY_DELAYS; with it, one."""
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
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings, self.tracker, self.resolver = settings, tracker, resolver
        self.generator, self.metrics, self.next = generator, metrics, next_stage
        self.tracing = tracing
        self._pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="fetch")
        self.fetch_attempts = 1 if settings.retry_delays else FETCH_ATTEMPTS
        self.adapter_names = tuple(settings.adapter_paths())
        """What an event's `adapter` may name: `default` (ADAPTER_PATH), then ADAPTERS."""

    def submit(self, record: InputRecord) -> None:
        size = len(record.key or b"") + len(record.value or b"")
        in_flight = self.tracker.in_flight()
        if in_flight >= self.settings.max_in_flight or (
            in_flight and self.tracker.in_flight_bytes() + size > self.settings.max_in_flight_bytes
        ):
            raise MessageRejected
        epoch = self.tracker.add(record.tp, record.offset, size)
        if epoch is None:
            return  # the partition is being rewound: this record will be read again
        self.metrics.in_flight.set(in_flight + 1)
        try:
            event = parse_event(record.value, self.settings.max_event_bytes)
            check_adapter(event, self.adapter_names)
        except Exception as exc:  # noqa: BLE001 - a record nobody foresaw is still only a dead letter
            error = exc if isinstance(exc, ProcessingError) else ParseError.unexpected(exc)
            hint = event_id_hint(record.value, self.settings.max_event_bytes)
            self.tracing.received(record, epoch, hint)
            self.next.submit(WorkItem(record, epoch, failure=error, event_id=hint))
            return
        self.tracing.received(record, epoch, event.id)  # before the fetch, whose span is its child
        image = self._pool.submit(self._resolve_image, event, record, epoch)
        self.next.submit(WorkItem(record, epoch, event=event, image=image, event_id=event.id))

    def _resolve_image(self, event: DiagramEvent, record: InputRecord, epoch: int) -> LoadedImage:
        """Fetch and decode, retrying transient fetch failures with backoff; then the model's preprocessing.

        Raises only `ProcessingError` (or `CancelledError` when the partition moved on meanwhile)."""
        with self.tracing.step(record, "fetch"):
            data = self._fetch(event, record, epoch)
        started = time.perf_counter()
        try:
            with self.tracing.step(record, "decode"):
                image = self.resolver.decode(data)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DecodeError.unexpected(exc) from exc
        decoded = time.perf_counter()
        self.metrics.stage_seconds.labels("decode").observe(decoded - started)
        try:
            # Image preprocessing here, in parallel, keeps it off the single model thread.
            with self.tracing.step(record, "prepare"):
                prepared = self.generator.prepare_image(image)
        except Exception as exc:  # noqa: BLE001
            raise PrepareError.unexpected(exc) from exc
        self.metrics.stage_seconds.labels("prepare").observe(time.perf_counter() - decoded)
        loaded = LoadedImage(
            image=image, source_bytes=len(data), decode_seconds=decoded - started, content_hash=content_hash(data)
        )
        return loaded.with_prepared(prepared)

    def _fetch(self, event: DiagramEvent, record: InputRecord, epoch: int) -> bytes:
        for attempt in range(1, self.fetch_attempts + 1):
            if not self.tracker.is_current(record.tp, epoch):
                raise CancelledError  # revoked or rewound while queued: the new owner reads it again
            started = time.perf_counter()
            try:
                data = self.resolver.fetch(event.image)
            except FetchError as error:
                error.attempts = attempt
                if not error.retryable or attempt == self.fetch_attempts:
                    raise
                self.metrics.events.labels("retried").inc()
                logger.info("retrying fetch for id=%s after %s (attempt %d)", event.id, error.message, attempt)
                time.sleep(FETCH_BACKOFF_S * 2 ** (attempt - 1))
                continue
            except Exception as exc:  # noqa: BLE001
                raise FetchError.unexpected(exc) from exc
            self.metrics.stage_seconds.labels("fetch").observe(time.perf_counter() - started)
            return data
        raise AssertionError("unreachable")

    def poll(self, timeout: float = 0.0) -> None:
        self.next.poll(timeout)

    def join(self, timeout: float) -> bool:
        return self.next.join(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.resolver.close()
        self.next.close()
