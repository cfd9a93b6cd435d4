"""An event's image reference to a decoded, bounded image: fetch or read the bytes, then decode them."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from consumer.events import ImageRef
from consumer.images.fetch import UrlFetcher
from consumer.images.local import PathReader, decode_base64
from consumer.images.shown import messages_shown_safely
from consumer.images.worker import DecodeWorkers

if TYPE_CHECKING:
    from consumer.engine.base import ImageFeatures
    from consumer.settings import Settings


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image | None
    """The decoded image; None once `prepared` holds all the engine needs (see `with_prepared`)."""
    source_bytes: int
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0
    prepared: ImageFeatures | None = None
    """The engine's `prepare_image` output, filled in on the fetch thread (see engine/base.py)."""
    decoded_size: tuple[int, int] | None = None
    """The decoded image's (width, height), kept when the image itself is let go."""
    content_hash: str | None = None
    """sha256 of the image's bytes as fetched, hex (`metadata.content_hash`); None where not computed."""

    @property
    def size(self) -> tuple[int, int]:
        if self.decoded_size is not None:
            return self.decoded_size
        assert self.image is not None, "a LoadedImage holds its image or its decoded size"
        return self.image.size

    def with_prepared(self, prepared: ImageFeatures | None) -> LoadedImage:
        """This image with the engine's preprocessing. Once that exists the decoded pixels are let go:
        an event can wait a whole CPU batch for its turn, and MAX_IN_FLIGHT images at
        IMAGE_MAX_DECODED_PIXELS would hold gigabytes (40 Mpx of RGB is 120 MB)."""
        if prepared is None:
            return self
        return replace(self, image=None, prepared=prepared, decoded_size=self.size)


class ImageResolver:
    """Turns an `ImageRef` into a `LoadedImage`, within the limits of `Settings`. Thread-safe.

    Every `FetchError`/`DecodeError` its methods raise has a message that is printable, valid UTF-8
    and at most MAX_MESSAGE_CHARS long (consumer/images/shown.py), whatever the event held.
    Decoding runs in worker processes (consumer/images/worker.py), started on first use; `close`
    stops them (they also end by themselves when this process does)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fetcher = UrlFetcher(settings.image_max_bytes, settings.image_fetch_timeout, settings.image_allowed_hosts)
        self.path_reader = PathReader(settings.image_root, settings.image_max_bytes)
        self.image_root = self.path_reader.image_root
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that, and turning the warning into an
        # error needs warnings.catch_warnings, which is not thread-safe; so its limit is applied here.
        pillow_limit = Image.MAX_IMAGE_PIXELS or settings.image_max_decoded_pixels
        self.pixel_limit = min(settings.image_max_decoded_pixels, pillow_limit)
        self.decoder = DecodeWorkers(self.pixel_limit, settings.image_decode_timeout, max_idle=settings.fetch_workers)

    def resolve(self, ref: ImageRef) -> LoadedImage:
        """Fetch and decode; raises only `FetchError` or `DecodeError` for a bad reference or image."""
        started = time.perf_counter()
        data = self.fetch(ref)
        fetched = time.perf_counter()
        image = self.decode(data)
        return LoadedImage(
            image=image,
            source_bytes=len(data),
            fetch_seconds=fetched - started,
            decode_seconds=time.perf_counter() - fetched,
        )

    def fetch(self, ref: ImageRef) -> bytes:
        """The image's bytes, from wherever `ref` says; raises `FetchError` for a reference it refuses."""
        if ref.url is not None:
            return self.fetch_url(ref.url)
        if ref.path is not None:
            return self.read_path(ref.path)
        return self.decode_base64(ref.base64 or "")

    def fetch_url(self, url: str) -> bytes:
        with messages_shown_safely():
            return self.fetcher.fetch(url)

    def read_path(self, reference: str) -> bytes:
        with messages_shown_safely():
            return self.path_reader.read(reference)

    def decode_base64(self, text: str) -> bytes:
        with messages_shown_safely():
            return decode_base64(text, self.settings.image_max_bytes)

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> 8-bit RGB in a decode worker, within IMAGE_DECODE_TIMEOUT and the memory bound."""
        with messages_shown_safely():
            return self.decoder.decode(data)

    def close(self) -> None:
        """Stop the idle decode workers."""
        self.decoder.close()
