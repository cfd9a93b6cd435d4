"""How text from an event appears in error messages and logs: printable, valid UTF-8, bounded.

Error messages become dead-letter headers (UTF-8 on the wire) and log lines, so text copied from an
event must survive both: a lone surrogate ("\\ud800" is valid JSON) cannot be encoded at all, and
control or bidirectional-override characters would make a log line lie about what it says.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from consumer.errors import DecodeError, FetchError

MAX_MESSAGE_CHARS = 1000
"""Every `FetchError`/`DecodeError` message leaving the image layer is at most this many characters
(so at most 4,000 bytes of UTF-8), well under the dead-letter header's own cut."""

ELLIPSIS = "…"


def printable(text: str, limit: int) -> str:
    """`text` with every character that is not printable (controls, format characters such as
    right-to-left marks, lone surrogates, unassigned code points) written as a Python escape
    (`\\x00`, `\\u200f`, `\\ud800`), cut to at most `limit` characters with a trailing "…".

    The result always encodes as UTF-8. Backslashes are kept as they are, so applying this twice
    changes nothing."""
    if len(text) <= limit and text.isprintable():
        return text
    pieces: list[str] = []
    length = 0
    for character in text:
        piece = character if character.isprintable() else character.encode("unicode_escape").decode("ascii")
        pieces.append(piece)
        length += len(piece)
        if length > limit:
            break
    if length <= limit:
        return "".join(pieces)
    while length > limit - len(ELLIPSIS):  # whole escapes only: never half of "\\ud800"
        length -= len(pieces.pop())
    return "".join(pieces) + ELLIPSIS


@contextmanager
def messages_shown_safely() -> Iterator[None]:
    """Whatever `FetchError`/`DecodeError` leaves this block carries a printable message of at most
    MAX_MESSAGE_CHARS: the one rule every message obeys, however it was built."""
    try:
        yield
    except (FetchError, DecodeError) as error:
        error.message = printable(error.message, MAX_MESSAGE_CHARS)
        error.args = (error.message,)
        raise
