"""Fault injection for the service as a subprocess, through its one seam (TEST_HOOK, consumer/hooks.py).

TEST_HOOK=tests.hooks:stall_while_file_exists STALL_FILE=/tmp/x   # main thread stands still while x exists
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import confluent_kafka

from consumer import clients
from consumer.settings import Settings

logger = logging.getLogger(__name__)


def _stall_while_exists(path: Path, where: str) -> None:
    if path.exists():
        logger.warning("STALL_FILE %s exists: stalling %s until it is removed", path, where)
        while path.exists():
            time.sleep(0.05)
        logger.warning("STALL_FILE removed: going on")


def stall_while_file_exists(settings: Settings) -> None:
    """While STALL_FILE exists the main thread stands still: before the warm-up, and in every poll of
    the consumer. The side server, on its own thread, has to notice from the outside."""
    stall_file = Path(os.environ["STALL_FILE"])

    class StallingConsumer(confluent_kafka.Consumer):
        def poll(self, *args: Any, **kwargs: Any) -> Any:
            _stall_while_exists(stall_file, "the poll loop")
            return super().poll(*args, **kwargs)

    clients.Consumer = StallingConsumer  # type: ignore[misc]  # what observed_consumer_factory builds

    from consumer.engine.qwen import QwenVLEngine

    warm_up = QwenVLEngine.warm_up

    def stalling_warm_up(engine: QwenVLEngine) -> float:
        _stall_while_exists(stall_file, "before the warm-up")
        return warm_up(engine)

    QwenVLEngine.warm_up = stalling_warm_up  # type: ignore[method-assign]


def fail_or_hang_on_marker(settings: Settings) -> None:
    """Images whose bytes are b"RAISE" make decoding raise an exception nobody foresaw; images whose
    bytes are b"HANG" make fetching hang for good: what one record can do to a worker thread."""
    import threading

    from consumer.images.resolver import ImageResolver

    fetch, decode = ImageResolver.fetch, ImageResolver.decode

    def hanging_fetch(resolver: ImageResolver, ref: Any) -> bytes:
        data = fetch(resolver, ref)
        if data == b"HANG":
            logger.warning("HANG: this fetch thread now waits for good")
            threading.Event().wait()
        return data

    def raising_decode(resolver: ImageResolver, data: bytes) -> Any:
        if data == b"RAISE":
            raise RuntimeError("injected: a decoder bug nobody foresaw")
        return decode(resolver, data)

    ImageResolver.fetch = hanging_fetch  # type: ignore[method-assign]
    ImageResolver.decode = raising_decode  # type: ignore[method-assign]
