"""One exception family for everything that can go wrong with a single event.

The dead-letter path, the metrics and the logs all read the same object: the stage it failed at, a
short machine-readable reason, and a message a person can act on.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal, TypeVar

Stage = Literal["parse", "fetch", "decode", "prepare", "infer", "result", "publish"]
"""Where an event failed, in the order it passes them: its record parsed, its image fetched and decoded,
prepared for the model (resize, patchify), described by the model, its result built, published."""
STAGES: tuple[Stage, ...] = ("parse", "fetch", "decode", "prepare", "infer", "result", "publish")

UNEXPECTED = "unexpected"
"""The reason of an error the service did not foresee (a bug, or input nobody thought of): the event
is dead-lettered all the same, with the exception's class in error.class."""


class ProcessingError(Exception):
    """An event that cannot be turned into a result. `retryable` failures are worth another try."""

    stage: Stage = "parse"

    def __init__(
        self, message: str, *, reason: str = "invalid", retryable: bool = False, error_class: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable
        self.attempts = 1
        self.error_class = error_class or type(self).__name__
        """What the dead letter's error.class names: this class, or the unforeseen exception's."""

    @classmethod
    def unexpected(cls: type[E], exc: BaseException) -> E:
        """An unforeseen exception while handling one event, as this stage's error (reason `unexpected`)."""
        return cls(f"unexpected {type(exc).__name__}: {exc}", reason=UNEXPECTED, error_class=type(exc).__name__)


E = TypeVar("E", bound=ProcessingError)


class ParseError(ProcessingError):
    """The event is not a valid diagram event (not JSON, wrong type, bad image reference)."""

    stage: Stage = "parse"


class FetchError(ProcessingError):
    """The image bytes could not be obtained (refused reference, HTTP error, too large, timeout)."""

    stage: Stage = "fetch"


class DecodeError(ProcessingError):
    """The bytes are not an image this service accepts (not raster, corrupt, too many pixels)."""

    stage: Stage = "decode"


class PrepareError(ProcessingError):
    """The engine could not prepare the decoded image for the model (resize, normalise, patchify)."""

    stage: Stage = "prepare"


class InferError(ProcessingError):
    """The model failed on this event."""

    stage: Stage = "infer"


class ResultError(ProcessingError):
    """The model's answer could not be turned into a result record."""

    stage: Stage = "result"


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
