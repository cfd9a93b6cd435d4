"""POST /infer, the old HTTP service's endpoint, through the pipeline's own engine and batches.

The model must never run twice at once (one set of weights, one device, a `generate` that is not
thread-safe), and an HTTP request must neither jump ahead of Kafka work nor wait behind a queue of
it. `SharedEngine` wraps the engine the pipeline uses: an /infer image waits in a small queue, and
the next model call takes it along in the same batch, up to BATCH_SIZE images: the pipeline's next
batch if one is coming, else the request's own thread once the model is free.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

from aiohttp import web
from PIL import Image

from consumer.engine.base import Engine, EngineInfo, Generation, GenerationRequest
from consumer.errors import DecodeError
from consumer.images import ImageResolver

if TYPE_CHECKING:
    from consumer.metrics import Metrics
    from consumer.pipeline import ServiceState
    from consumer.settings import Settings

logger = logging.getLogger(__name__)


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

    def __init__(self, engine: Engine, batch_size: int) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self._model = threading.Lock()
        self._waiting: deque[_Rider] = deque()

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def last_preprocess_seconds(self) -> float:
        return getattr(self.engine, "last_preprocess_seconds", 0.0)

    def load(self) -> None:
        self.engine.load()

    def prepare_image(self, image: Image.Image) -> object | None:
        """The engine's per-image preprocessing: thread-safe and model-free, so it takes no lock."""
        return self.engine.prepare_image(image)

    def warm_up(self) -> None:
        self.engine.warm_up()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The pipeline's batch, with any waiting /infer images in the free seats, in one call."""
        with self._model:
            riders = self._board(self.batch_size - len(requests))
            if not riders:
                return self.engine.generate(requests)
            started = time.perf_counter()
            try:
                generations = self.engine.generate([*requests, *(rider.request for rider in riders)])
            except Exception:  # noqa: BLE001 - find out whose image it was: each side on its own
                self._run(riders)
                return self.engine.generate(requests)
            share = (time.perf_counter() - started) / len(generations)
            for rider, generation in zip(riders, generations[len(requests) :]):
                self._finish(rider, generation, share)
            return generations[: len(requests)]

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
        started = time.perf_counter()
        try:
            generations = self.engine.generate([rider.request for rider in riders])
        except Exception as exc:  # noqa: BLE001 - reported to the HTTP client, never to Kafka work
            if len(riders) == 1:
                riders[0].error = exc
                riders[0].done.set()
                return
            for rider in riders:
                self._run([rider])
            return
        share = (time.perf_counter() - started) / len(riders)
        for rider, generation in zip(riders, generations):
            self._finish(rider, generation, share)

    @staticmethod
    def _finish(rider: _Rider, generation: Generation, generation_time: float) -> None:
        rider.generation, rider.generation_time = generation, generation_time
        rider.done.set()


def make_infer_handler(
    settings: Settings, engine: SharedEngine, state: ServiceState, metrics: Metrics
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of POST /infer: multipart field `file` in, `{description, metadata}` out.

    Errors answer `{"detail": ...}` (the old FastAPI service's shape): 400 for a missing file or bytes
    that are not an acceptable image, 413 over IMAGE_MAX_BYTES, 503 until the model is warm, 500 when
    the model fails.
    """
    resolver = ImageResolver(settings)  # the same size and pixel limits as Kafka events

    def answer(status: int, body: dict) -> web.Response:
        metrics.infer_requests.labels(str(status)).inc()
        return web.json_response(body, status=status)

    async def infer(request: web.Request) -> web.Response:
        if not state.ready:
            return answer(503, {"detail": "the model is not loaded and warmed yet; retry when /health is 200"})
        started = time.perf_counter()
        try:
            data, filename = await _read_file_field(request, settings.image_max_bytes)
        except _TooLarge:
            return answer(413, {"detail": f"the image is over IMAGE_MAX_BYTES={settings.image_max_bytes} bytes"})
        if data is None:
            return answer(400, {"detail": "send the image as multipart/form-data field 'file' (curl -F file=@x.png)"})
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(None, resolver.decode, data)
        except DecodeError as error:
            return answer(400, {"detail": error.message})
        try:
            generation, generation_time = await loop.run_in_executor(
                None, engine.infer, GenerationRequest(image=image, prompt=settings.prompt)
            )
        except Exception as exc:  # noqa: BLE001 - the client learns the model failed, the service goes on
            logger.exception("POST /infer: the model failed on %s", filename)
            return answer(500, {"detail": f"the model failed: {type(exc).__name__}: {exc}"})
        info = engine.info
        inference_time = time.perf_counter() - started
        logger.info(
            "POST /infer %s %dx%d described in %.2f s (%d tokens)", filename, *image.size, inference_time,
            generation.output_tokens,
            extra={"outcome": "ok", "upload": filename, "inference_time": round(inference_time, 4)},
        )
        return answer(
            200,
            {
                "description": generation.text,
                "metadata": {
                    "inference_time": round(inference_time, 4),
                    "generation_time": round(generation_time, 4),
                    "image_size": list(image.size),
                    "model": info.model,
                    "device": info.device,
                    "adapter": info.adapter,
                    "output_tokens": generation.output_tokens,
                },
            },
        )

    return infer


class _TooLarge(Exception):
    pass


async def _read_file_field(request: web.Request, limit: int) -> tuple[bytes | None, str | None]:
    """The bytes and file name of multipart field `file`, read at most `limit` bytes far."""
    if not request.content_type.startswith("multipart/"):
        return None, None
    try:
        reader = await request.multipart()
        async for part in reader:
            if getattr(part, "name", None) != "file":
                continue
            body = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise _TooLarge
            return bytes(body), part.filename
    except (ValueError, AssertionError):
        return None, None
    return None, None
