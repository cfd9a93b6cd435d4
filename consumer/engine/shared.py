"""One engine for two callers: the pipeline's batches and POST /infer's single images.

The model must never run twice at once (one set of weights, one device, a `generate` that is not
thread-safe), and an HTTP request must neither jump ahead of Kafka work nor wait behind a queue of
it. An /infer image waits in a small queue, and the next model call takes it along in the same batch,
up to the batch size: the pipeline's next batch if one is coming, else the request's own thread once
the model is free.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image

from consumer.engine.base import Generation, GenerationBatch, GenerationRequest, Generator, ImageFeatures


@dataclass
class _Rider:
    """One /infer image waiting for a seat in a model call."""

    request: GenerationRequest
    done: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None
    generation_time: float = 0.0
    error: BaseException | None = None


class SharedEngine:
    """The one engine, shared by the pipeline's inference thread and POST /infer.

    Promises: one model call at a time; every /infer image is described exactly once, in some call of
    at most `batch_size` images; a failure of one side's images never fails the other side's.
    """

    def __init__(self, engine: Generator, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._model = threading.Lock()
        self._waiting: deque[_Rider] = deque()

    def prepare_image(self, image: Image.Image) -> ImageFeatures | None:
        """The engine's per-image preprocessing: thread-safe and model-free, so it takes no lock."""
        return self.engine.prepare_image(image)

    def generate(self, requests: Sequence[GenerationRequest]) -> GenerationBatch:
        """The pipeline's batch, with any waiting /infer images in the free seats, in one call."""
        with self._model:
            riders = self._board(self.batch_size - len(requests))
            if not riders:
                return self.engine.generate(requests)
            try:
                batch = self.engine.generate([*requests, *(rider.request for rider in riders)])
            except Exception:  # noqa: BLE001 - find out whose image it was: each side on its own
                self._run(riders)
                return self.engine.generate(requests)
            share = batch.seconds / len(batch.generations)
            for rider, generation in zip(riders, batch.generations[len(requests) :], strict=True):
                self._finish(rider, generation, share)
            return GenerationBatch(batch.generations[: len(requests)], batch.seconds, batch.preprocess_seconds)

    def infer(self, request: GenerationRequest) -> tuple[Generation, float]:
        """Describe one image; blocks until done. Returns it with its share of the call's time."""
        rider = _Rider(request)
        self._waiting.append(rider)
        with self._model:
            # Whoever held the model before us may have taken this rider along already.
            while not rider.done.is_set():
                self._run(self._board(self.batch_size))
        if rider.error is not None:
            raise rider.error
        assert rider.generation is not None
        return rider.generation, rider.generation_time

    def _board(self, seats: int) -> list[_Rider]:
        riders: list[_Rider] = []
        while len(riders) < seats:
            try:
                riders.append(self._waiting.popleft())
            except IndexError:
                break
        return riders

    def _run(self, riders: list[_Rider]) -> None:
        """Describe `riders` in one call; if it fails, one by one so one bad image fails alone."""
        if not riders:
            return
        try:
            batch = self.engine.generate([rider.request for rider in riders])
        except Exception as exc:  # noqa: BLE001 - reported to the HTTP client, never to Kafka work
            if len(riders) == 1:
                riders[0].error = exc
                riders[0].done.set()
                return
            for rider in riders:
                self._run([rider])
            return
        share = batch.seconds / len(riders)
        for rider, generation in zip(riders, batch.generations, strict=True):
            self._finish(rider, generation, share)

    @staticmethod
    def _finish(rider: _Rider, generation: Generation, generation_time: float) -> None:
        rider.generation, rider.generation_time = generation, generation_time
        rider.done.set()
