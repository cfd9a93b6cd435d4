"""The `python -m consumer replay` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from typing import TextIO

from consumer.errors import STAGES
from consumer.replay.replayer import Replayer
from consumer.replay.selection import DEFAULT_MAX_REPLAYS, Filters, ReplayOptions, parse_time
from consumer.settings import Settings

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def time_argument(text: str) -> datetime:
        try:
            return parse_time(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def count_argument(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("must be at least 1")
        return value

    chosen = parser.add_argument_group(
        "which dead letters (each given filter must match; repeat one for any of several)"
    )
    chosen.add_argument("--stage", action="append", choices=STAGES, default=[], help="header error.stage")
    chosen.add_argument("--error-class", action="append", default=[], metavar="CLASS", help="header error.class")
    chosen.add_argument("--reason", action="append", default=[], help="header error.reason")
    chosen.add_argument("--event-id", action="append", default=[], metavar="ID", help="header event.id")
    chosen.add_argument(
        "--since",
        type=time_argument,
        metavar="TIME",
        help="dead-lettered at or after this ISO 8601 time (UTC if no offset)",
    )
    chosen.add_argument("--until", type=time_argument, metavar="TIME", help="dead-lettered before this ISO 8601 time")
    parser.add_argument("--dry-run", action="store_true", help="print what would be sent; send and commit nothing")
    parser.add_argument(
        "--max-replays",
        type=count_argument,
        default=DEFAULT_MAX_REPLAYS,
        metavar="N",
        help=f"refuse a record sent back N times already (default {DEFAULT_MAX_REPLAYS})",
    )
    parser.add_argument(
        "--group", help="consumer group recording progress (default: <KAFKA_GROUP_ID>-replay-<digest of the filters>)"
    )


def options_from(args: argparse.Namespace) -> ReplayOptions:
    filters = Filters(
        stages=frozenset(args.stage),
        error_classes=frozenset(args.error_class),
        reasons=frozenset(args.reason),
        event_ids=frozenset(args.event_id),
        since=args.since,
        until=args.until,
    )
    return ReplayOptions(filters=filters, max_replays=args.max_replays, dry_run=args.dry_run, group=args.group)


def run_replay(settings: Settings, options: ReplayOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    return Replayer(settings, options, out, err).run()
