"""`python -m consumer replay`: chosen dead letters sent back to the input topic, each at most a few times.

It reads DLQ_TOPIC from where its consumer group left off up to the end the topic had when the run
began (read_committed: dead letters of aborted transactions are never replayed). Each dead letter
that matches every filter (error.stage, error.class, error.reason, event.id, record time) goes back to
INPUT_TOPIC with its input's key and value and a `replay.count` header one above the count it had;
at --max-replays it is refused instead, so an event that keeps failing cannot loop.

The count it had: the dead letter's own `replay.count` header when it carries one (the input's,
copied), else the header of the input record itself, read from source.topic/partition/offset while
that topic still holds it; an input no longer held counts as never replayed. The same read brings
back a value the dead letter left out (`error.value_omitted`) and a key it replaced by its SHA-256
(`error.key_hashed`); where the input is gone, that dead letter is reported and not sent.

Progress is the consumer group's committed offsets on DLQ_TOPIC, committed after each batch's
records are acknowledged by the broker: a second run with the same filters sends nothing again, and
a run stopped between the acknowledgement and the commit sends that batch again (at least once).
The group is named after the filters unless --group names one; --dry-run prints what it would send
and commits nothing.

Output: one JSON line per matching dead letter on stdout (what was done with it and why), progress
and a summary on stderr. Exit status: `ReplayExit`.
"""

from consumer.replay.cli import add_arguments, options_from, run_replay
from consumer.replay.selection import (
    DeadLetter,
    Filters,
    ReplayExit,
    ReplayOptions,
    SourceRecord,
    Unavailable,
    check_source,
    decide,
    parse_time,
    read_dead_letter,
    replay_group,
)

__all__ = [
    "DeadLetter",
    "Filters",
    "ReplayExit",
    "ReplayOptions",
    "SourceRecord",
    "Unavailable",
    "add_arguments",
    "check_source",
    "decide",
    "options_from",
    "parse_time",
    "read_dead_letter",
    "replay_group",
    "run_replay",
]
