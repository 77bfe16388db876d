"""The `gqn-fast` command line: `gqn-fast data ...`, `gqn-fast train ...`, `gqn-fast eval ...`.

Every command's arguments are in gqn_fast/arguments.py, which imports nothing heavy: the
module that runs a command (and torch) is imported only when it runs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _nothing_to_show(default) -> bool:
    return default is None or default is False or default == ""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless there is none to show (None, an off
    flag) or the help already says what it is."""

    def _get_help_string(self, action):
        if _nothing_to_show(action.default) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with DefaultsFormatter; add_subparsers makes sub-parsers of the
    parent's class, so every command's help shows its defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and not _nothing_to_show(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"  # argparse shows no default without a help
        return super().add_argument(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from gqn_fast.arguments import REGISTER

    parser = Parser(prog="gqn-fast", description="Train, evaluate and feed a Generative Query Network.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in REGISTER:
        register(subparsers)
    return parser


def command_function(run: str):
    """The function a command's "module:function" names."""
    module, name = run.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    from gqn_fast.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(command_function(args.run)(args) or 0)
    except (UserError, OSError) as error:
        command = " ".join(part for part in (args.command, getattr(args, "data_command", None)) if part)
        print(f"gqn-fast {command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
