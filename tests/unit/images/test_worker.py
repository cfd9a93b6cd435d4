"""Decode workers: real child processes held to IMAGE_DECODE_TIMEOUT seconds of CPU and a memory
bound, replaced when they fail, and never trusted in what they answer.

The CPU bomb here is one no structural check catches: a PNG with a million empty IDAT chunks, which
Pillow walks in a Python loop (about 2 s of CPU per 12 MB) before it decodes a 64x64 image.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import sys
import threading
import time
import zlib

import pytest
from PIL import Image

from consumer.errors import DecodeError
from consumer.images import ImageResolver
from consumer.settings import Settings

SMALL_PNG = (lambda buffer: (Image.new("RGB", (40, 30), (10, 20, 30)).save(buffer, "PNG"), buffer.getvalue())[1])(
    io.BytesIO()
)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_empty_chunks(count: int) -> bytes:
    """A valid 64x64 PNG whose pixel data comes after `count` empty IDAT chunks."""
    pixels = zlib.compress(b"\0" * (1 + 3 * 64) * 64)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + header
        + png_chunk(b"IDAT", b"") * count
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def refused(call, *args) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        call(*args)
    return caught.value


def test_an_image_that_takes_too_much_cpu_is_stopped_and_the_next_one_decodes():
    """Before: there was no bound on decode time at all; this one would take about 6 s of CPU."""
    decoding = ImageResolver(Settings(image_decode_timeout=1.0))
    bomb = png_with_empty_chunks(3_000_000)
    error = refused(decoding.decode, bomb)  # stopped by the worker's CPU limit (reason), not by a clock here
    assert error.reason == "decode_timeout" and "IMAGE_DECODE_TIMEOUT" in error.message
    assert decoding.decode(SMALL_PNG).size == (40, 30)


def test_the_same_image_decodes_within_a_larger_bound():
    assert ImageResolver(Settings(image_decode_timeout=30)).decode(png_with_empty_chunks(100_000)).size == (64, 64)


def test_an_image_over_the_memory_bound_is_refused_by_the_worker():
    decoding = ImageResolver(Settings())
    decoding.decoder.memory_bytes = 16 * 1024 * 1024  # for workers started from now on
    big = Image.new("RGB", (4000, 4000), "white")  # 64 MB in Pillow's 4 bytes per pixel
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    error = refused(decoding.decode, buffer.getvalue())
    assert error.reason in ("out_of_memory", "decoder_crashed"), error.message
    assert decoding.decode(SMALL_PNG).size == (40, 30)


def test_a_worker_is_reused_after_a_refusal_and_replaced_after_a_crash():
    decoding = ImageResolver(Settings(image_decode_timeout=30))
    decoding.decode(SMALL_PNG)
    (first,) = decoding.decoder._idle
    assert refused(decoding.decode, b"not an image").reason == "not_an_image"
    assert decoding.decoder._idle == [first], "a plain refusal should not cost a worker"

    # A decoder that crashes (here: killed mid-image) fails its image, not the service.
    slow = png_with_empty_chunks(1_500_000)
    threading.Timer(0.5, os.kill, (first.process.pid, signal.SIGSEGV)).start()
    error = refused(decoding.decode, slow)
    assert error.reason == "decoder_crashed" and "SIGSEGV" in error.message
    assert decoding.decode(SMALL_PNG).size == (40, 30)
    assert decoding.decoder._idle[0] is not first


def fake_worker(script: str):
    from consumer.images.worker import _Worker

    return _Worker([sys.executable, "-c", script])


ANSWERS = """
import json, os, sys
from multiprocessing.connection import Connection
requests, replies = Connection(0, writable=False), Connection(1, readable=False)
requests.recv_bytes()
"""


@pytest.mark.parametrize(
    "answer",
    [
        "replies.send_bytes(json.dumps({'size': [100000, 100000], 'rows': 1}).encode())",
        "replies.send_bytes(json.dumps({'size': [4, 4], 'rows': 0}).encode())",
        "replies.send_bytes(b'not json')",
        "replies.send_bytes(json.dumps({'reason': 'x y\\\\n', 'message': 'm'}).encode())",
        "replies.send_bytes(json.dumps({'size': [4, 4], 'rows': 4}).encode()); replies.send_bytes(b'short')",
        "replies.send_bytes(json.dumps({'size': [4, 4], 'rows': 4}).encode()); replies.send_bytes(bytes(10**6))",
    ],
)
def test_what_a_worker_answers_is_checked_like_input(answer):
    worker = fake_worker(ANSWERS + answer + "\nimport time; time.sleep(5)\n")
    try:
        error = refused(worker.decode, SMALL_PNG, 1_000_000, 10.0)
        assert error.reason == "decoder_crashed" and worker.broken
    finally:
        worker.stop()


def test_a_worker_that_stops_answering_is_killed_at_the_wall_clock_bound():
    worker = fake_worker(ANSWERS + "import time; time.sleep(60)\n")
    started = time.monotonic()
    try:
        error = refused(worker.decode, SMALL_PNG, 1_000_000, 0.5)
    finally:
        worker.stop()
    assert error.reason == "decode_timeout" and "wall-clock" in error.message
    assert time.monotonic() - started < 10


def test_a_refusal_without_a_message_is_still_a_refusal():
    worker = fake_worker(ANSWERS + "replies.send_bytes(json.dumps({'reason': 'corrupt'}).encode())\n")
    try:
        error = refused(worker.decode, SMALL_PNG, 1_000_000, 10.0)
        assert error.reason == "corrupt" and error.message and not worker.broken
    finally:
        worker.stop()
