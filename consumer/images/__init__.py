"""Image references -> decoded, bounded, RGB PIL images.

Every reference comes from another service, so each kind is handled defensively:

- url: http and https only. The host is resolved once; every address it resolves to must be public
  (not loopback, private, CGNAT, link-local, multicast, reserved or unspecified, v4 or v6, embedded
  v4 forms judged by their v4 part) unless the host is listed in IMAGE_ALLOWED_HOSTS. The connection
  goes to the checked address (no second lookup that DNS rebinding could answer differently), TLS
  verifies the certificate against the URL's host name, each redirect (at most 3) is checked the same
  way, and IMAGE_FETCH_TIMEOUT bounds the whole fetch - connect, headers and a body trickled one byte
  at a time - because a watchdog shuts the socket when it runs out. IMAGE_MAX_BYTES is enforced
  while streaming.
- path: only under IMAGE_ROOT (after resolving `..` and symlinks); unset refuses path references.
- base64: size-capped before decoding, strict alphabet and padding (ASCII whitespace such as MIME
  line breaks is allowed and ignored; a `data:...;base64,` prefix is accepted).
- decoding: the format is sniffed from the bytes and must be a raster format this service opens;
  width x height from the header is checked against IMAGE_MAX_DECODED_PIXELS before any pixel is
  decoded, with Pillow's own bomb guard as an error as well; the first frame of an animation is used
  and the result is always 8-bit RGB, rotated by its EXIF orientation.

Every refusal is a `FetchError` or `DecodeError` with a short `reason` and a message that says what to
fix; nothing else escapes `ImageResolver.resolve` for bad input (tests/unit/test_images.py checks
this with arbitrary bytes and text).

Modules: `url` (fetching, SSRF guard), `local` (base64 and IMAGE_ROOT paths), `decode` (bytes to
bounded RGB), `resolver` (the three together, as the pipeline uses them).
"""

from consumer.images.resolver import ImageResolver, LoadedImage
from consumer.images.url import address_is_public, parse_image_url, redact_url

__all__ = ["ImageResolver", "LoadedImage", "address_is_public", "parse_image_url", "redact_url"]
