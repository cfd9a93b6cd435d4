"""One exception family for everything that can go wrong with a single event.

The dead-letter path, the metrics and the logs all read the same object: the stage it failed at, a
short machine-readable reason, and a message a person can act on.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

Stage = Literal["parse", "fetch", "decode", "infer", "publish"]


class ProcessingError(Exception):
    """An event that cannot be turned into a result. `retryable` failures are worth another try."""

    stage: Stage = "parse"

    def __init__(self, message: str, *, reason: str = "invalid", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.attempts = 1


class ParseError(ProcessingError):
    """The event is not a valid diagram event (not JSON, wrong type, bad image reference)."""

    stage: Stage = "parse"


class FetchError(ProcessingError):
    """The image bytes could not be obtained (refused reference, HTTP error, too large, timeout)."""

    stage: Stage = "fetch"


class DecodeError(ProcessingError):
    """The bytes are not an image this service accepts (not raster, corrupt, too many pixels)."""

    stage: Stage = "decode"


class InferError(ProcessingError):
    """The model failed on this event."""

    stage: Stage = "infer"


class PublishError(ProcessingError):
    """The result cannot be published (for example larger than the broker accepts)."""

    stage: Stage = "publish"


class ExitCode(IntEnum):
    """`python -m consumer run`'s exit status."""

    CLEAN = 0
    """Shutdown finished the batch in flight, published and committed it."""
    UNFINISHED = 1
    """Shutdown ran out of SHUTDOWN_TIMEOUT (or the broker was unreachable): unfinished work is left
    uncommitted, for the group to redo."""
    FAILED = 2
    """Stopped on an unrecoverable error (a publish failed, a worker crashed); nothing more was committed."""
    LOAD_FAILED = 3
    """The model or its adapter could not be loaded."""
    KILLED = 130
    """A second SIGTERM/SIGINT: exited at once, without a clean shutdown."""
