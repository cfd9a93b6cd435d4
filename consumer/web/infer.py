"""POST /infer, the old HTTP service's endpoint, through the pipeline's own engine and batches.

The image waits for a seat in the next model call (consumer/engine/shared.py), so the model never
runs twice at once and an HTTP request neither jumps ahead of Kafka work nor waits behind a queue of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from aiohttp import BodyPartReader, web

from consumer.engine.base import GenerationRequest
from consumer.errors import DecodeError
from consumer.events import GenerationMetadata, InferResponse, description_fields
from consumer.images import ImageResolver
from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.state import ServiceState

logger = logging.getLogger(__name__)


def make_infer_handler(
    settings: Settings, state: ServiceState, metrics: Metrics
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of POST /infer: multipart field `file` in, `{description, metadata}` out.

    Errors answer `{"detail": ...}` (the old FastAPI service's shape): 400 for a missing file or bytes
    that are not an acceptable image, 413 over IMAGE_MAX_BYTES, 503 until the model is warm, 500 when
    the model fails.
    """
    resolver = ImageResolver(settings)  # the same size and pixel limits as Kafka events

    def answer(status: int, body: dict[str, object]) -> web.Response:
        metrics.infer_requests.labels(str(status)).inc()
        return web.json_response(body, status=status)

    async def infer(request: web.Request) -> web.Response:
        engine, info = state.shared_engine, state.engine
        if not state.ready or engine is None or info is None:
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
        inference_time = time.perf_counter() - started
        logger.info(
            "POST /infer %s %dx%d described in %.2f s (%d tokens)",
            filename,
            *image.size,
            inference_time,
            generation.output_tokens,
            extra={"outcome": "ok", "upload": filename, "inference_time": round(inference_time, 4)},
        )
        adapter = generation.adapter
        response = InferResponse(
            **description_fields(generation.text),
            metadata=GenerationMetadata(
                inference_time=round(inference_time, 4),
                generation_time=round(generation_time, 4),
                image_size=image.size,
                model=info.model,
                adapter=adapter.path if adapter else info.adapter,
                adapter_name=adapter.name if adapter else None,
                adapter_hash=adapter.hash if adapter else None,
                device=info.device,
                dtype=info.dtype,
                output_tokens=generation.output_tokens,
            ),
        )
        return answer(200, response.model_dump(mode="json"))

    return infer


class _TooLarge(Exception):
    pass


async def _read_file_field(request: web.Request, limit: int) -> tuple[bytes | None, str | None]:
    """The bytes and file name of multipart field `file`, read at most `limit` bytes far."""
    if not request.content_type.startswith("multipart/"):
        return None, None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name != "file":
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
