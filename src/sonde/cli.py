"""The ``sonde`` command line."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sonde", description="Probes for every layer of a network while it trains.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train small networks on scikit-learn's digits with probes on")
    demo.add_argument("--store", default="sonde.db", help="SQLite store path (default: sonde.db)")
    demo.add_argument("--logdir", default="runs", help="TensorBoard/CSV directory (default: runs)")
    demo.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "demo":
        from sonde.demo import print_summary, run_demo

        print_summary(run_demo(store=args.store, logdir=args.logdir, epochs=args.epochs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
