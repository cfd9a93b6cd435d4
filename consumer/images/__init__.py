"""Image references -> decoded, bounded, RGB PIL images.

Every reference comes from another service, so each kind is handled defensively:

- url: http and https only, valid Unicode (a lone surrogate anywhere is refused before anything is
  sent). The host is resolved once; every address it resolves to must be public (not loopback,
  private, CGNAT, link-local, multicast, reserved or unspecified, v4 or v6, embedded v4 forms judged
  by their v4 part) unless the host is listed in IMAGE_ALLOWED_HOSTS. The connection goes to the
  checked address (no second lookup that DNS rebinding could answer differently), TLS verifies the
  certificate against the URL's host name, each redirect (at most 3) is checked the same way, and
  IMAGE_FETCH_TIMEOUT bounds the whole fetch - name resolution, connect, headers and a body trickled
  one byte at a time - because the lookup is waited for with the time left and a watchdog shuts the
  socket when it runs out. IMAGE_MAX_BYTES is enforced while streaming. A URL is shown in messages
  and logs only through `redact_url`: no userinfo, no query values, no fragment.
- path: only under IMAGE_ROOT; unset refuses path references. The reference is resolved and checked,
  then opened beneath the root with no symlink followed at any component (openat2, or a walk), so
  a directory swapped for a symlink in between is refused, not followed.
- base64: size-capped before decoding, strict alphabet and padding (ASCII whitespace such as MIME
  line breaks is allowed and ignored; a `data:...;base64,` prefix is accepted).
- decoding: the format is sniffed from the bytes and must be a raster format this service opens;
  width x height from the header is checked against IMAGE_MAX_DECODED_PIXELS before any pixel is
  decoded, with Pillow's own bomb guard as an error as well; a JPEG with more than 64 scans or
  1,000 marker segments is refused unread, and so is an image whose decoder would hold more than
  the memory bound (a multi-scan JPEG's coefficients, libwebp's canvases, a TIFF's strip); the first
  frame of an animation is used and the result is always 8-bit RGB, rotated by its EXIF orientation.
  Decoding runs in a worker process held to IMAGE_DECODE_TIMEOUT seconds of CPU and to 8 bytes per
  pixel of IMAGE_MAX_DECODED_PIXELS (plus 64 MiB) of memory, so no format's decoder, C or Python, can
  take longer or more, and a crashing decoder fails one image, not the service.

Every refusal is a `FetchError` or `DecodeError` with a short `reason` and a message that says what to
fix, printable UTF-8 of at most 1,000 characters; nothing else escapes `ImageResolver.resolve` for bad
input (tests/unit/images/test_resolver.py checks this with arbitrary bytes and text, lone surrogates
included).

Modules: `url` (fetching, SSRF guard, redaction), `local` (base64 and IMAGE_ROOT paths), `decode`
(bytes to bounded RGB), `worker` (decoding in processes that can be ended), `shown` (how event text
appears in messages), `resolver` (all of them together, as the pipeline uses them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from consumer.images.resolver import ImageResolver, LoadedImage
    from consumer.images.url import address_is_public, parse_image_url, redact_url

__all__ = ["ImageResolver", "LoadedImage", "address_is_public", "parse_image_url", "redact_url"]

# Imported on first use, not with the package: a decode worker (python -m consumer.images.worker)
# imports this package on its way to Pillow, and should not pay for pydantic and urllib3 as well.
_HOMES = {
    "ImageResolver": "consumer.images.resolver",
    "LoadedImage": "consumer.images.resolver",
    "address_is_public": "consumer.images.url",
    "parse_image_url": "consumer.images.url",
    "redact_url": "consumer.images.url",
}


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
