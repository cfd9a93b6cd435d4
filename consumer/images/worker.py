"""Decoding in worker processes that can be ended, so that no image, in any format, holds a fetch
thread or the service's memory for longer or more than its bounds.

Why processes: a thread inside one of Pillow's C decoders cannot be stopped, and part of Pillow's
parsing is Python loops over the file (JPEG markers, GIF extension blocks, TIFF directories, BMP RLE
runs) that no other thread can interrupt either. A process can be ended: the kernel stops it at its
CPU limit and refuses its allocations past its memory limit, and a crash in a C decoder ends the
worker, not the service (which would otherwise restart, read the same record and crash again).

Each image is decoded by `decode_image` (decode.py) in a worker - `python -m consumer.images.worker`,
which imports Pillow and nothing else of the service - held, per image, to:

- CPU: RLIMIT_CPU, set before each image to the worker's CPU time so far plus IMAGE_DECODE_TIMEOUT,
  rounded up to a whole second (the kernel's unit). Past it the kernel sends SIGXCPU, which ends the
  worker: `decode_timeout`. A wall-clock watchdog of WALL_CLOCK_FACTOR x IMAGE_DECODE_TIMEOUT + 5 s
  (seconds of CPU come slower on a busy machine) kills a worker that stops answering: also
  `decode_timeout`. CPU seconds rather than wall-clock seconds are the bound so that whether an
  image is accepted does not depend on how busy the machine was.
- Memory: RLIMIT_DATA, set before each image to what the worker already holds (its input included)
  plus DECODE_BYTES_PER_PIXEL x the pixel limit + MEMORY_SLACK_BYTES (8 x 40 Mpx + 64 MiB = 384 MB
  at the defaults). Allocations past it fail: `out_of_memory`, or `decoder_crashed` where a C
  library does not survive a failed allocation. decode.py keeps legitimate images under the 8 bytes
  per pixel (bench/image_memory.py measures them); this limit is what holds for anything else.
- The service process itself holds only the RGB result (Pillow's 4 bytes per pixel) and one strip
  of STRIP_BYTES while it arrives.

Protocol, over two pipes with multiprocessing.connection's length-prefixed framing: the service sends
the image bytes; the worker answers with one JSON header - {"size": [width, height], "rows": n} or
{"reason": ..., "message": ...} - then, for an image, its RGB pixels in strips of n rows. Nothing a
worker sends is unpickled or trusted: it has just parsed hostile bytes, so its sizes are checked
against the pixel limit and its strips against their length, like any other input.

Workers start on first use (about 0.3 s), decode one image after another, and at most `max_idle` wait
between images; a worker that failed in any way but a plain refusal is never reused. A worker whose
service is gone sees its input pipe close and exits. Linux only (RLIMIT_DATA counts mmap since 4.7).

Residual risk: a worker that decodes for IMAGE_DECODE_TIMEOUT costs that much CPU and up to the
memory bound while it runs, once per event (decode failures are not retried); FETCH_WORKERS of them
can run at once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import warnings
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from PIL import Image

from consumer.errors import DecodeError
from consumer.images.decode import DECODE_BYTES_PER_PIXEL, decode_image
from consumer.images.shown import MAX_MESSAGE_CHARS, printable

WALL_CLOCK_FACTOR = 4
WALL_CLOCK_SLACK_S = 5.0
"""Beside WALL_CLOCK_FACTOR x IMAGE_DECODE_TIMEOUT: a new worker's start, the pixels' way back."""
MEMORY_SLACK_BYTES = 64 * 1024 * 1024
"""Room beside the pixels: decoder tables and buffers, Python's own objects."""
STRIP_BYTES = 4 * 1024 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class DecodeWorkers:
    """Decodes image bytes in worker processes, within the bounds above. Thread-safe: each caller
    gets a worker of its own, so up to as many images decode at once as there are callers."""

    def __init__(self, pixel_limit: int, cpu_seconds: float, max_idle: int) -> None:
        self.pixel_limit = pixel_limit
        self.cpu_seconds = cpu_seconds
        self.memory_bytes = DECODE_BYTES_PER_PIXEL * pixel_limit + MEMORY_SLACK_BYTES
        self.max_idle = max_idle
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        # Idle workers are stopped when this object goes (tests make many); at exit, by their pipes closing.
        self._finalizer = weakref.finalize(self, _stop_all, self._idle)

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> 8-bit RGB, as `decode_image` does; raises only `DecodeError`."""
        worker = self._take()
        try:
            return worker.decode(data, self.pixel_limit, WALL_CLOCK_FACTOR * self.cpu_seconds + WALL_CLOCK_SLACK_S)
        finally:
            self._give_back(worker)

    def close(self) -> None:
        """Stop the idle workers (one decoding now is stopped when it is given back)."""
        self._finalizer()

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.process.poll() is None:
                    return worker
                worker.stop()
        return self._start()

    def _start(self) -> _Worker:
        command = [
            sys.executable,
            "-m",
            "consumer.images.worker",
            str(self.pixel_limit),
            repr(self.cpu_seconds),
            str(self.memory_bytes),
        ]
        try:
            return _Worker(command)
        except OSError as exc:
            raise DecodeError(f"cannot start an image decode worker: {exc}", reason="decoder_crashed") from None

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not worker.broken and self._finalizer.alive and len(self._idle) < self.max_idle:
                self._idle.append(worker)
                return
        worker.stop()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()


class _Worker:
    """One worker process and its two pipes."""

    def __init__(self, command: list[str]) -> None:
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([_PACKAGE_PARENT, *filter(None, [os.environ.get("PYTHONPATH")])]),
            # Large allocations straight from mmap and back to the kernel when freed, so a worker that
            # decoded a 40 Mpx image does not keep hundreds of MB while it waits for the next one.
            "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024),
        }
        try:
            # A session of its own: a Ctrl-C meant for the service (which then finishes the images in
            # flight) must not end the workers decoding them.
            self.process = subprocess.Popen(
                command,
                stdin=to_worker_read,
                stdout=from_worker_write,
                env=environment,
                close_fds=True,
                start_new_session=True,
            )
        except OSError:
            for fd in (to_worker_read, to_worker_write, from_worker_read, from_worker_write):
                os.close(fd)
            raise
        os.close(to_worker_read)
        os.close(from_worker_write)
        self.requests = Connection(to_worker_write, readable=False)
        self.replies = Connection(from_worker_read, writable=False)
        self.broken = False
        """True once this worker must not decode again: it timed out, crashed or said something wrong."""
        self.timed_out = False

    def decode(self, data: bytes, pixel_limit: int, wall_seconds: float) -> Image.Image:
        watchdog = threading.Timer(wall_seconds, self._expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            self.requests.send_bytes(data)
            header = self._header(self._receive(_MAX_HEADER_BYTES), pixel_limit)
            if "reason" in header:
                message = printable(str(header.get("message", "")), MAX_MESSAGE_CHARS)
                raise DecodeError(message or "image refused", reason=str(header["reason"]))
            (width, height), rows = header["size"], header["rows"]
            image = Image.new("RGB", (width, height))
            for top in range(0, height, rows):
                strip_rows = min(rows, height - top)
                strip = self._receive(width * strip_rows * 3)
                if len(strip) != width * strip_rows * 3:
                    raise self._protocol_error(f"a strip of {len(strip)} bytes for {width}x{strip_rows} pixels")
                image.paste(Image.frombytes("RGB", (width, strip_rows), strip), (0, top))
            return image
        except (EOFError, OSError):
            self.broken = True
            raise self._ended() from None
        except MemoryError:
            self.broken = True  # the rest of the pixels are still in the pipe
            raise DecodeError(
                "the decoded image does not fit in this process's memory", reason="out_of_memory"
            ) from None
        finally:
            watchdog.cancel()
            if self.timed_out:  # it fired as the image was done: the worker is being killed all the same
                self.broken = True

    def _receive(self, max_bytes: int) -> bytes:
        try:
            return self.replies.recv_bytes(max_bytes)
        except OSError as exc:
            if self.timed_out or self.process.poll() is not None:
                raise
            raise self._protocol_error(str(exc)) from None

    def _header(self, raw: bytes, pixel_limit: int) -> dict[str, Any]:
        try:
            header = json.loads(raw)
        except ValueError:
            raise self._protocol_error("a header that is not JSON") from None
        if not isinstance(header, dict):
            raise self._protocol_error("a header that is not an object")
        if "reason" in header:
            reason = header["reason"]
            if not (isinstance(reason, str) and reason.isascii() and reason.isidentifier() and len(reason) <= 40):
                raise self._protocol_error("a malformed reason")
            return header
        size, rows = header.get("size"), header.get("rows")
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(type(side) is int and side > 0 for side in size)
            and size[0] * size[1] <= pixel_limit
            and type(rows) is int
            and rows > 0
        ):
            raise self._protocol_error(f"an image size outside the limits: {str(header)[:100]}")
        return header

    def _protocol_error(self, what: str) -> DecodeError:
        self.broken = True
        return DecodeError(f"the image decode worker answered {what}; image refused", reason="decoder_crashed")

    def _ended(self) -> DecodeError:
        """The worker hung up mid-image: say why, from how it ended."""
        try:
            status = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        if self.timed_out:
            return DecodeError(
                "decoding the image took over its wall-clock bound and was stopped "
                "(IMAGE_DECODE_TIMEOUT seconds of CPU, on a machine too busy to give them)",
                reason="decode_timeout",
            )
        if status == -signal.SIGXCPU:
            return DecodeError(
                "decoding the image took over IMAGE_DECODE_TIMEOUT seconds of CPU and was stopped; "
                "such images cost too much to decode (many scans, frames or chunks?)",
                reason="decode_timeout",
            )
        how = f"signal {_signal_name(-status)}" if status < 0 else f"exit status {status}"
        return DecodeError(f"the image decode worker ended on this image ({how})", reason="decoder_crashed")

    def _expire(self) -> None:
        self.timed_out = True
        self.process.kill()

    def stop(self) -> None:
        """End the worker and reap it: closing its input ends a healthy one waiting for work at once;
        a broken one is killed."""
        if self.broken:
            self.process.kill()
        self.broken = True
        for connection in (self.requests, self.replies):
            connection.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the worker process ------------------------------------------------------------------------------


def serve(pixel_limit: int, cpu_seconds: float, memory_bytes: int) -> int:
    """The worker's loop: image bytes in on fd 0, header and strips out on what was fd 1."""
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # a stray print goes to stderr, never into the replies
    requests = Connection(0, writable=False)
    warnings.simplefilter("ignore")  # Pillow warns about damaged files; the refusal says what matters
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would otherwise dump hundreds of MB
    while True:
        try:
            data = requests.recv_bytes()
        except EOFError:
            return 0
        _limit_cpu(cpu_seconds)
        _limit_memory(memory_bytes)
        try:
            image = decode_image(data, pixel_limit)
        except DecodeError as error:
            replies.send_bytes(json.dumps({"reason": error.reason, "message": error.message}).encode())
            continue
        finally:
            del data
        width, height = image.size
        rows = max(1, STRIP_BYTES // (width * 3))
        replies.send_bytes(json.dumps({"size": [width, height], "rows": rows}).encode())
        for top in range(0, height, rows):
            replies.send_bytes(image.crop((0, top, width, min(top + rows, height))).tobytes())
        del image


def _limit_cpu(cpu_seconds: float) -> None:
    user, system = os.times()[:2]
    soft, hard = math.ceil(user + system + cpu_seconds), resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _limit_memory(memory_bytes: int) -> None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return  # not Linux: no limit beyond decode.py's own checks
    held = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmData:")), None)
    if held is None:
        return
    soft, hard = held + memory_bytes, resource.getrlimit(resource.RLIMIT_DATA)[1]
    resource.setrlimit(resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])))
