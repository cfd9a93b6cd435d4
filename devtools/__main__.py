"""Tools for a checkout: `python -m devtools demo | broker | make-tiny-model DIR`.

None of this ships in the wheel; the service itself is `python -m consumer run`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from consumer.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="local broker + sample diagrams + descriptions printed")
    demo.add_argument("--count", type=int, default=6, help="how many sample diagrams to send")
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random Qwen3-VL and two LoRA adapters")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    commands.add_parser("broker", help="run a local single-node Kafka broker until Ctrl-C")
    args = parser.parse_args(argv)
    configure_logging()

    if args.command == "demo":
        from devtools.demo import run_demo

        return run_demo(count=args.count)
    if args.command == "make-tiny-model":
        from devtools.tiny import SECOND_ADAPTER, make_tiny_model

        adapter = make_tiny_model(args.directory, seed=args.seed)
        second = args.directory.resolve() / SECOND_ADAPTER
        print(f"BASE_MODEL_ID={args.directory.resolve()} ADAPTER_PATH={adapter.resolve()} ADAPTERS=b={second}")
        return 0
    from devtools.local_kafka import LocalKafka

    # SIGTERM stops the broker like Ctrl-C does, instead of leaving its java process behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with LocalKafka() as broker:
        print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
