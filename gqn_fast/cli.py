"""The `gqn-fast` command line: `gqn-fast data ...`, `gqn-fast train ...`, `gqn-fast eval ...`.

Each command group lives in its own module and registers its sub-parser here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module with `register(subparsers)`; imported lazily so `--help` stays fast.
COMMAND_MODULES = ["gqn_fast.data.commands", "gqn_fast.train", "gqn_fast.evaluate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqn-fast", description="Train, evaluate and feed a Generative Query Network."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
