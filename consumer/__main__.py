"""Command line: `python -m consumer run | demo | make-tiny-model DIR | broker`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from consumer.logs import configure_logging

logger = logging.getLogger("consumer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="the service, configured from the environment (see README)")
    demo = commands.add_parser("demo", help="local broker + sample diagrams + descriptions printed")
    demo.add_argument("--count", type=int, default=6, help="how many sample diagrams to send")
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random Qwen3-VL and a LoRA adapter")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    commands.add_parser("broker", help="run a local single-node Kafka broker until Ctrl-C")
    args = parser.parse_args(argv)

    if args.command == "run":
        from consumer.service import run_service
        from consumer.settings import Settings

        settings = Settings.from_environ()
        configure_logging(settings.log_level, settings.log_format)
        return run_service(settings)
    configure_logging()
    if args.command == "demo":
        from consumer.demo import run_demo

        return run_demo(count=args.count)
    if args.command == "make-tiny-model":
        from consumer.engine.tiny import make_tiny_model

        adapter = make_tiny_model(args.directory, seed=args.seed)
        print(f"BASE_MODEL_ID={args.directory.resolve()} ADAPTER_PATH={adapter.resolve()}")
        return 0
    if args.command == "broker":
        import signal
        import time

        from consumer.local_kafka import LocalKafka

        # SIGTERM stops the broker like Ctrl-C does, instead of leaving its java process behind.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with LocalKafka() as broker:
            print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
