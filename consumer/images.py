"""Image references -> decoded, bounded, RGB PIL images.

Every reference comes from another service, so each path is defensive: URLs are fetched only from
public addresses (unless the host is in IMAGE_ALLOWED_HOSTS), over the address that was checked, with
timeouts and a byte cap enforced while streaming; paths stay under IMAGE_ROOT; base64 is size-capped
before decoding; and the pixel count is read from the header and checked before any pixel is decoded.
Every refusal is a `FetchError` or `DecodeError` whose message says what to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import urllib3
from PIL import Image, ImageOps, UnidentifiedImageError

from consumer.errors import DecodeError, FetchError
from consumer.events import ImageRef

if TYPE_CHECKING:
    from consumer.settings import Settings

logger = logging.getLogger(__name__)

RASTER_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"}
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image
    source_bytes: int
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def address_is_public(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged by its IPv4 part)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip.is_link_local)


class ImageResolver:
    """Turns an `ImageRef` into a `LoadedImage`, within the limits of `Settings`. Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.image_root = settings.image_root.resolve() if settings.image_root else None
        self.allowed_hosts = settings.image_allowed_hosts

    def resolve(self, ref: ImageRef) -> LoadedImage:
        started = time.perf_counter()
        if ref.url is not None:
            data = self.fetch_url(ref.url)
        elif ref.path is not None:
            data = self.read_path(ref.path)
        else:
            data = self.decode_base64(ref.base64 or "")
        fetched = time.perf_counter()
        image = self.decode(data)
        return LoadedImage(
            image=image, source_bytes=len(data), fetch_seconds=fetched - started,
            decode_seconds=time.perf_counter() - fetched,
        )

    # -- base64 ----------------------------------------------------------------------------------
    def decode_base64(self, text: str) -> bytes:
        limit = self.settings.image_max_bytes
        if len(text) > (limit + 2) // 3 * 4 + 4:
            raise FetchError(
                f"inline base64 image is {len(text)} characters, over the {limit}-byte limit "
                "(IMAGE_MAX_BYTES); send a url or path reference for large images",
                reason="too_large",
            )
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]  # tolerate a data: URL prefix
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FetchError(f"image.base64 is not valid base64: {exc}", reason="invalid_base64") from None

    # -- path ------------------------------------------------------------------------------------
    def read_path(self, reference: str) -> bytes:
        if self.image_root is None:
            raise FetchError("path references are disabled: IMAGE_ROOT is not set", reason="path_disabled")
        candidate = Path(reference)
        if not candidate.is_absolute():
            candidate = self.image_root / candidate
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise FetchError(f"image path {reference!r} does not exist under IMAGE_ROOT", reason="not_found") from None
        if not resolved.is_relative_to(self.image_root):
            raise FetchError(
                f"image path {reference!r} resolves outside IMAGE_ROOT ({self.image_root})", reason="outside_root"
            )
        if not resolved.is_file():
            raise FetchError(f"image path {reference!r} is not a regular file", reason="not_a_file")
        size = resolved.stat().st_size
        if size > self.settings.image_max_bytes:
            raise FetchError(
                f"image file is {size} bytes, over IMAGE_MAX_BYTES={self.settings.image_max_bytes}", reason="too_large"
            )
        return resolved.read_bytes()

    # -- url -------------------------------------------------------------------------------------
    def fetch_url(self, url: str) -> bytes:
        deadline = time.monotonic() + self.settings.image_fetch_timeout
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(url, deadline)
            if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                response.release_conn()
                continue
            return self._read_body(url, response, deadline)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects fetching the image", reason="too_many_redirects")

    def _checked_address(self, host: str, port: int) -> str:
        """Resolve `host` once and return the address to connect to, refusing non-public ones."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise FetchError(f"cannot resolve image host {host!r}: {exc}", reason="dns", retryable=True) from None
        addresses = [info[4][0] for info in infos]
        if host.lower() not in self.allowed_hosts:
            private = [address for address in addresses if not address_is_public(address)]
            if private:
                raise FetchError(
                    f"image host {host!r} resolves to a non-public address ({private[0]}); "
                    "add it to IMAGE_ALLOWED_HOSTS if it is a trusted internal image server",
                    reason="forbidden_address",
                )
        return addresses[0]

    def _request(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"image URL must be http or https with a host, got {url[:200]!r}", reason="bad_scheme")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._checked_address(parts.hostname, port)
        remaining = max(deadline - time.monotonic(), 0.1)
        timeout = urllib3.Timeout(connect=min(remaining, 5.0), read=remaining)
        # Connect to the address that was checked (no second DNS lookup that could be rebound);
        # TLS still verifies the certificate against the URL's host name.
        if parts.scheme == "https":
            pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
                address, port, timeout=timeout, retries=False, server_hostname=parts.hostname,
                assert_hostname=parts.hostname,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        try:
            response = pool.urlopen(
                "GET", path, headers={"Host": host_header, "Accept": "image/*"}, redirect=False,
                preload_content=False, assert_same_host=False,
            )
        except urllib3.exceptions.TimeoutError:
            raise FetchError(f"timed out fetching {url[:200]}", reason="timeout", retryable=True) from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"cannot fetch {url[:200]}: {exc}", reason="connection", retryable=True) from None
        if response.status >= 400:
            response.release_conn()
            retryable = response.status >= 500 or response.status == 429
            raise FetchError(
                f"image URL answered HTTP {response.status}", reason=f"http_{response.status}", retryable=retryable
            )
        return response

    def _read_body(self, url: str, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        limit = self.settings.image_max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            response.release_conn()
            raise FetchError(f"image is {declared} bytes, over IMAGE_MAX_BYTES={limit}", reason="too_large")
        body = bytearray()
        try:
            for chunk in response.stream(_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise FetchError(f"image is over IMAGE_MAX_BYTES={limit} bytes", reason="too_large")
                if time.monotonic() > deadline:
                    raise FetchError(
                        f"fetching {url[:200]} took over IMAGE_FETCH_TIMEOUT", reason="timeout", retryable=True
                    )
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"connection broke fetching {url[:200]}: {exc}", reason="connection", retryable=True) from None
        finally:
            response.release_conn()
        return bytes(body)

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, data: bytes) -> Image.Image:
        head = data[:1024].lstrip()
        if head.startswith(b"%PDF"):
            raise DecodeError("PDF is not a raster image; render the page to PNG first", reason="not_raster")
        if head[:5].lower() in (b"<?xml", b"<svg ") or b"<svg" in head[:512].lower():
            raise DecodeError("SVG is not a raster image; render it to PNG first", reason="not_raster")
        limit = self.settings.image_max_decoded_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if image.format not in RASTER_FORMATS:
                    raise DecodeError(f"unsupported image format {image.format}", reason="unsupported_format")
                width, height = image.size
                if width * height > limit:
                    raise DecodeError(
                        f"image is {width}x{height} = {width * height} pixels, over the "
                        f"{limit}-pixel limit (IMAGE_MAX_DECODED_PIXELS); downscale it before sending",
                        reason="too_many_pixels",
                    )
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # animated: the first frame
                image.load()
                return to_rgb(ImageOps.exif_transpose(image) or image)
        except DecodeError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DecodeError(
                "bytes are not a supported raster image (PNG, JPEG, GIF, WebP, BMP, TIFF)", reason="not_an_image"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise DecodeError(f"image is corrupt or truncated: {exc}", reason="corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Palette, alpha, CMYK and 16-bit images to 8-bit RGB; transparency becomes white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
