"""Image bytes that come with the event or from this machine: inline base64, and files under IMAGE_ROOT.

- base64: size-capped before decoding, strict alphabet and padding (ASCII whitespace such as MIME
  line breaks is allowed and ignored; a `data:...;base64,` prefix is accepted).
- path: only under IMAGE_ROOT (after resolving `..` and symlinks); unset refuses path references.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat
from pathlib import Path

from consumer.errors import FetchError

_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Inline base64 -> bytes. Strict alphabet and padding; ASCII whitespace (MIME line breaks)
    is ignored; a `data:<type>;base64,` prefix is accepted. The size is checked first."""
    limit = max_bytes
    max_chars = (limit + 2) // 3 * 4
    # Room for a line break every 76 characters and a data: prefix, before anything is copied.
    if len(text) > max_chars + max_chars // 38 + 256:
        raise _base64_too_large(len(text), limit)
    if text.startswith("data:"):
        prefix, comma, text = text.partition(",")
        if not comma or not prefix.lower().endswith(";base64"):
            raise FetchError(
                "image.base64 holds a data: URL that is not base64-encoded; expected 'data:<type>;base64,...'",
                reason="invalid_base64",
            )
    compact = text.translate(_WHITESPACE)
    if len(compact) > max_chars:
        raise _base64_too_large(len(compact), limit)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FetchError(
            f"image.base64 is not valid base64 (standard alphabet, '=' padding): {exc}", reason="invalid_base64"
        ) from None
    if len(data) > limit:
        raise _base64_too_large(len(compact), limit)
    return data


def _base64_too_large(chars: int, max_bytes: int) -> FetchError:
    return FetchError(
        f"image.base64 is {chars} characters, over the {max_bytes}-byte limit "
        "(IMAGE_MAX_BYTES); send a url or path reference for large images",
        reason="too_large",
    )


def read_path(reference: str, image_root: Path | None, max_bytes: int) -> bytes:
    """Read a file under IMAGE_ROOT; `..`, other absolute paths and symlinks out of it are refused."""
    if image_root is None:
        raise FetchError("path references are disabled: IMAGE_ROOT is not set", reason="path_disabled")
    shown = reference[:200]
    if "\x00" in reference:
        raise FetchError(f"image.path {shown!r} contains a NUL character", reason="bad_path")
    candidate = Path(reference)
    if not candidate.is_absolute():
        candidate = image_root / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise FetchError(f"image.path {shown!r} does not exist under IMAGE_ROOT", reason="not_found") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise FetchError(f"image.path {shown!r} cannot be resolved: {exc}", reason="bad_path") from None
    if not resolved.is_relative_to(image_root):
        raise FetchError(f"image.path {shown!r} resolves outside IMAGE_ROOT ({image_root})", reason="outside_root")
    # Checks run on the opened descriptor, so the file cannot be swapped between check and read;
    # O_NOFOLLOW refuses a last component turned into a symlink since it was resolved.
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        reason = "outside_root" if exc.errno == errno.ELOOP else "unreadable"
        raise FetchError(f"image.path {shown!r} cannot be opened: {exc.strerror}", reason=reason) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(f"image.path {shown!r} is not a regular file", reason="not_a_file")
        limit = max_bytes
        if info.st_size > limit:
            raise FetchError(
                f"image file {shown!r} is {info.st_size} bytes, over IMAGE_MAX_BYTES={limit}", reason="too_large"
            )
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        raise FetchError(f"image.path {shown!r} cannot be read: {exc.strerror}", reason="unreadable") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since fstat
        raise FetchError(f"image file {shown!r} is over IMAGE_MAX_BYTES={limit}", reason="too_large")
    return data
