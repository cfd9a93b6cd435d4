"""Image bytes that come with the event or from this machine: inline base64, and files under IMAGE_ROOT.

- base64: size-capped before decoding, strict alphabet and padding (ASCII whitespace such as MIME
  line breaks is allowed and ignored; a `data:...;base64,` prefix is accepted).
- path: only under IMAGE_ROOT; unset refuses path references. The reference is first resolved
  (`..` and symlinks, which may point anywhere inside the root) and checked to be under the root;
  then the resolved path is opened relative to the root directory with no symlink followed at any
  component: openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) where the kernel
  has it (Linux 5.6+ on x86-64 and aarch64), otherwise one `openat(O_NOFOLLOW)` per component. So a
  directory swapped for a symlink between the check and the open is refused (`outside_root`), not
  followed; the checks that follow (regular file, size) run on the opened descriptor, so the file
  cannot change under them either. The root's own path, which the operator chose, is followed as it
  is; a bind mount inside the root is trusted like the root.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import errno
import functools
import logging
import os
import platform
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from consumer.errors import FetchError
from consumer.images.shown import printable

logger = logging.getLogger(__name__)

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


OpenBeneath = Callable[[int, str, int], int]
"""Opens `relative` (a `/`-separated path with no `.`, `..` or empty parts) beneath the directory
`root_fd` with `flags`, following no symlink at any component; returns the descriptor or raises
OSError: ELOOP for a symlink met on the way, EXDEV for a path that leaves the root."""

# openat2(2): its number is 437 in the generic and x86-64 syscall tables; elsewhere it differs or is
# absent, and the component walk is used.
_OPENAT2_SYSCALL = 437
_OPENAT2_MACHINES = ("x86_64", "aarch64", "arm64")
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc_syscall() -> Callable[..., int] | None:
    if sys.platform != "linux" or platform.machine() not in _OPENAT2_MACHINES:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return syscall


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    syscall = _libc_syscall()
    if syscall is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how = _OpenHow(flags, 0, resolve)
    encoded = os.fsencode(path)
    for _ in range(3):  # EAGAIN: a concurrent rename the kernel could not rule out; it asks for a retry
        fd = syscall(
            ctypes.c_long(_OPENAT2_SYSCALL),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(encoded),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        code = ctypes.get_errno()
        if code != errno.EAGAIN:
            break
    raise OSError(code, os.strerror(code), path)


@functools.cache
def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter around it) lets openat2 through."""
    try:
        os.close(_openat2(_AT_FDCWD, "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0))
    except OSError as exc:
        logger.info("openat2 is not available (%s): IMAGE_ROOT paths are opened one component at a time", exc)
        return False
    return True


def openat2_beneath(root_fd: int, relative: str, flags: int) -> int:
    """`OpenBeneath` in one system call: the kernel refuses any symlink and any way out of the root."""
    resolve = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    return _openat2(root_fd, relative, flags | os.O_NOFOLLOW | os.O_CLOEXEC, resolve)


def walk_beneath(root_fd: int, relative: str, flags: int) -> int:
    """`OpenBeneath` one component at a time: each directory opened with O_NOFOLLOW | O_DIRECTORY
    relative to the one before, the last component with O_NOFOLLOW."""
    *directories, name = relative.split("/")
    if any(part in ("", ".", "..") for part in directories) or name in ("", ".."):
        raise OSError(errno.EXDEV, "path is not a plain relative path", relative)
    current = root_fd
    try:
        for directory in directories:
            try:
                opened = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            except NotADirectoryError:
                # O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR; say what it is, as openat2 would.
                if stat.S_ISLNK(os.stat(directory, dir_fd=current, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), directory) from None
                raise
            if current != root_fd:
                os.close(current)
            current = opened
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
    finally:
        if current != root_fd:
            os.close(current)


def default_open_beneath() -> OpenBeneath:
    """openat2 where the kernel has it, the component walk otherwise."""
    return openat2_beneath if openat2_available() else walk_beneath


def _no_race(_checked: Path) -> None:
    return None


class PathReader:
    """Reads image files under IMAGE_ROOT (see the module docstring). Thread-safe."""

    def __init__(self, image_root: Path | None, max_bytes: int, open_beneath: OpenBeneath | None = None) -> None:
        self.image_root = image_root.resolve() if image_root is not None else None
        self.max_bytes = max_bytes
        self.open_beneath = open_beneath or default_open_beneath()
        self.after_check: Callable[[Path], None] = _no_race
        """Called with the checked path between the check and the open. Only tests set it, to swap a
        directory for a symlink at exactly that moment; a no-op otherwise."""

    def read(self, reference: str) -> bytes:
        """The bytes of the file `reference` names; `..`, other absolute paths and symlinks out of the
        root are refused, as is anything swapped in on the way between the check and the read."""
        image_root = self.image_root
        if image_root is None:
            raise FetchError("path references are disabled: IMAGE_ROOT is not set", reason="path_disabled")
        shown = f"'{printable(reference, 200)}'"
        if "\x00" in reference:
            raise FetchError(f"image.path {shown} contains a NUL character", reason="bad_path")
        candidate = Path(reference)
        if not candidate.is_absolute():
            candidate = image_root / candidate
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise FetchError(f"image.path {shown} does not exist under IMAGE_ROOT", reason="not_found") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise FetchError(f"image.path {shown} cannot be resolved: {exc}"[:500], reason="bad_path") from None
        if not resolved.is_relative_to(image_root):
            raise FetchError(
                f"image.path {shown} resolves outside IMAGE_ROOT ({printable(str(image_root), 200)})",
                reason="outside_root",
            )
        self.after_check(resolved)
        fd = self._open(resolved.relative_to(image_root), shown)
        try:
            return self._read_regular_file(fd, shown)
        finally:
            os.close(fd)

    def _open(self, relative: Path, shown: str) -> int:
        assert self.image_root is not None
        try:
            root_fd = os.open(self.image_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FetchError(f"IMAGE_ROOT cannot be opened: {exc.strerror}", reason="unreadable") from None
        try:
            # O_NONBLOCK: a FIFO put there must not block the open; it is refused by fstat below.
            return self.open_beneath(root_fd, relative.as_posix(), os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV):
                raise FetchError(
                    f"image.path {shown} changed while it was opened: a symlink or a way out of IMAGE_ROOT "
                    "appeared on the way",
                    reason="outside_root",
                ) from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FetchError(f"image.path {shown} does not exist under IMAGE_ROOT", reason="not_found") from None
            raise FetchError(f"image.path {shown} cannot be opened: {exc.strerror}", reason="unreadable") from None
        finally:
            os.close(root_fd)

    def _read_regular_file(self, fd: int, shown: str) -> bytes:
        limit = self.max_bytes
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FetchError(f"image.path {shown} is not a regular file", reason="not_a_file")
            if info.st_size > limit:
                raise FetchError(
                    f"image file {shown} is {info.st_size} bytes, over IMAGE_MAX_BYTES={limit}", reason="too_large"
                )
            with os.fdopen(os.dup(fd), "rb") as file:
                data = file.read(limit + 1)
        except OSError as exc:
            raise FetchError(f"image.path {shown} cannot be read: {exc.strerror}", reason="unreadable") from None
        if len(data) > limit:  # it grew since fstat
            raise FetchError(f"image file {shown} is over IMAGE_MAX_BYTES={limit}", reason="too_large")
        return data
