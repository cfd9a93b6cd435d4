"""Infer: events batched, described by the model on one thread, and handed on as outcomes.

A batch is up to BATCH_SIZE events, or what arrived within BATCH_MAX_WAIT_MS of the first. Events
whose image failed (or that failed to parse) become `Failed` outcomes, to be dead-lettered; the rest
are generated together. If a batch's `generate` fails, each event is tried alone, so one bad event (a
poison message) is dead-lettered and the others still get their results. Events of a partition that
was revoked or rewound meanwhile are dropped: the partition's owner reads them again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from consumer.engine.adapters import DEFAULT_ADAPTER
from consumer.engine.base import GenerationRequest, Generator
from consumer.errors import FetchError, InferError, ProcessingError
from consumer.images import LoadedImage
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.settings import Settings
from consumer.stages.base import Described, Failed, FatalLatch, Outcome, Stage, WorkItem
from consumer.stages.resolve import FETCH_ATTEMPTS, FETCH_BACKOFF_S
from consumer.tracing import NO_TRACING, Tracing

if TYPE_CHECKING:
    from consumer.result_cache.step import ResultStep

logger = logging.getLogger(__name__)

_STOP = object()
PREPARE_ALLOWANCE_S = 60.0
"""Besides the fetch's and the decode worker's own deadlines: what preparing one image may take before
infer stops waiting for it (a backstop: the fetch and the decoder bound themselves)."""


def _adapter_of(item: WorkItem) -> str | None:
    """The adapter an event runs on; None for one that failed before (it needs no model and joins any batch)."""
    return (item.event.adapter or DEFAULT_ADAPTER) if item.event is not None and item.failure is None else None


def resolve_wait_s(settings: Settings) -> float:
    """How long a batch waits for an image that is still being resolved before dead-lettering it: every
    fetch attempt's deadline and backoff, the decode worker's wall-clock backstop (4 x
    IMAGE_DECODE_TIMEOUT + 5 s, consumer/images/worker.py), and PREPARE_ALLOWANCE_S."""
    backoff = sum(FETCH_BACKOFF_S * 2.0**attempt for attempt in range(FETCH_ATTEMPTS - 1))
    decode = 4 * settings.image_decode_timeout + 5
    return settings.image_fetch_timeout * FETCH_ATTEMPTS + backoff + decode + PREPARE_ALLOWANCE_S


class Infer:
    """Runs its own thread (`start`); `submit` only queues."""

    def __init__(
        self,
        settings: Settings,
        batch_size: int,
        tracker: OffsetTracker,
        generator: Generator,
        metrics: Metrics,
        latch: FatalLatch,
        next_stage: Stage[list[Outcome]],
        results: ResultStep | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings, self.batch_size, self.tracker = settings, batch_size, tracker
        self.generator, self.metrics, self.latch, self.next = generator, metrics, latch, next_stage
        self.results, self.tracing = results, tracing
        """`results`: result keys, and the result cache's answers before the model (consumer/result_cache/)."""
        self._queue: queue.Queue[WorkItem | object] = queue.Queue()
        self._held: deque[WorkItem] = deque()
        """Events taken from the queue while a batch of another adapter gathered: the next batches' first."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: WorkItem) -> None:
        self._queue.put(item)  # bounded upstream: resolve refuses records past MAX_IN_FLIGHT

    def poll(self, timeout: float = 0.0) -> None:
        self.next.poll(timeout)

    def join(self, timeout: float) -> bool:
        """Finish the batch being generated, start no other (queued events are left uncommitted, for
        the group to redo); True once the thread is done."""
        self._stopping.set()
        self._queue.put(_STOP)  # wake the thread if it is waiting for work
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        self._stopping.set()
        self._queue.put(_STOP)

    # -- the inference thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                outcomes = self._describe(batch)
                if outcomes:
                    self.next.submit(outcomes)
        except BaseException as exc:  # noqa: BLE001 - the poll loop must stop, committing nothing more
            logger.exception("inference thread failed; stopping without committing in-flight work")
            self.latch.trip(exc)

    def _next_batch(self) -> list[WorkItem] | None:
        """The next batch, or None when stopping.

        With several adapters (ADAPTERS) a batch holds events of one adapter, the oldest waiting event's:
        events of another that arrive meanwhile wait in `_held` and start the next batches. The engine
        runs a mixed batch as one model call per adapter, which costs each call its own decode steps."""
        if self._held:
            first = self._held.popleft()
        else:
            queued = self._queue.get()
            if not isinstance(queued, WorkItem):
                return None
            first = queued
        if self._stopping.is_set():
            return None
        batch = [first]
        adapter = _adapter_of(first)

        def joins(item: WorkItem) -> bool:
            nonlocal adapter
            if adapter is None:  # so far only events that need no model: the next one decides
                adapter = _adapter_of(item)
            return _adapter_of(item) in (adapter, None)

        waiting: deque[WorkItem] = deque()
        while self._held:
            held = self._held.popleft()
            (batch if len(batch) < self.batch_size and joins(held) else waiting).append(held)
        self._held = waiting
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000
        while len(batch) < self.batch_size:
            try:
                queued = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if not isinstance(queued, WorkItem):
                self._queue.put(queued)
                break
            (batch if joins(queued) else self._held).append(queued)
        return None if self._stopping.is_set() else batch

    def _describe(self, batch: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        ready: list[tuple[WorkItem, LoadedImage]] = []
        deadline = time.monotonic() + resolve_wait_s(self.settings)
        for item in batch:
            if not self.tracker.is_current(item.tp, item.epoch):
                continue  # partition revoked or rewound: its owner processes the event again
            if item.failure is not None:
                outcomes.append(Failed(item, item.failure))
                continue
            assert item.image is not None  # a parsed event has its image on the way
            try:
                ready.append((item, item.image.result(timeout=max(deadline - time.monotonic(), 0.0))))
            except FutureTimeout:
                message = f"the image was not fetched and decoded within {resolve_wait_s(self.settings):.0f} s"
                outcomes.append(Failed(item, FetchError(message, reason="timeout")))
            except ProcessingError as error:
                outcomes.append(Failed(item, error))
            except CancelledError:
                continue  # shutting down, or its partition moved on: left uncommitted
            except Exception as exc:  # noqa: BLE001 - resolve raises ProcessingError; anything else is still one event's
                outcomes.append(Failed(item, FetchError.unexpected(exc)))
        if ready:
            logger.info("generating a batch of %d: %s", len(ready), " ".join(item.describe() for item, _ in ready))
            outcomes.extend(self.results.answer(ready, self._generate) if self.results else self._generate(ready))
        return outcomes

    def _generate(self, ready: list[tuple[WorkItem, LoadedImage]]) -> list[Outcome]:
        """Outcomes for a batch; if the batch fails, each event alone."""
        requests = []
        for item, loaded in ready:
            assert item.event is not None
            prompt = item.event.prompt or self.settings.prompt
            adapter = item.event.adapter or DEFAULT_ADAPTER
            requests.append(
                GenerationRequest(image=loaded.image, prompt=prompt, prepared=loaded.prepared, adapter=adapter)
            )
        started_ns = time.time_ns()
        try:
            batch = self.generator.generate(requests)
        except Exception as exc:  # noqa: BLE001 - one bad image must not sink its batch
            self.tracing.generated([item.record for item, _ in ready], started_ns, time.time_ns(), exc)
            if len(ready) > 1:
                logger.warning("batch of %d failed (%s); retrying one by one", len(ready), exc)
                return [outcome for pair in ready for outcome in self._generate([pair])]
            error = InferError(f"model failed: {exc}", reason=type(exc).__name__)
            return [Failed(ready[0][0], error)]
        self.tracing.generated([item.record for item, _ in ready], started_ns, time.time_ns(), None)
        preprocess_time = min(batch.preprocess_seconds, batch.seconds)
        self.metrics.stage_seconds.labels("preprocess").observe(preprocess_time)
        self.metrics.stage_seconds.labels("generate").observe(batch.seconds - preprocess_time)
        self.metrics.batch_size.observe(len(ready))
        self.metrics.observe_generation(batch.seconds, len(ready))
        share = batch.seconds / len(ready)
        outcomes: list[Outcome] = []
        for (item, loaded), generation in zip(ready, batch.generations, strict=True):
            self.metrics.generated_tokens.inc(generation.output_tokens)
            outcomes.append(Described(item, loaded, generation, share, len(ready)))
        return outcomes
