"""Command line: `python -m consumer run`, the service, and `python -m consumer replay`, dead letters
sent back to the input topic; both configured from the environment (docs/configuration.md).

Development tools (demo, local broker, tiny model) are `python -m devtools` in a checkout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from consumer.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="the service, configured from the environment (see docs/configuration.md)")
    from consumer.replay import __doc__ as replay_doc
    from consumer.replay import add_arguments as add_replay_arguments

    add_replay_arguments(
        commands.add_parser(
            "replay",
            help="send chosen dead letters back to the input topic (see docs/operations.md)",
            description=(replay_doc or "").split("\n\n")[1],
        )
    )
    args = parser.parse_args(argv)

    from consumer.settings import Settings

    settings = Settings.from_environ()
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "replay":
        from consumer.replay import options_from, run_replay

        return run_replay(settings, options_from(args))
    from consumer.service import run_service

    return run_service(settings)


def exit_now(code: int) -> None:
    """End the process once the service has settled its offsets, without joining worker threads: a
    fetch thread stuck in a slow server or a decoder cannot be stopped, and must not keep the replica
    alive past its shutdown (the grace period would end in a SIGKILL)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
