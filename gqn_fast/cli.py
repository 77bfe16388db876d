"""The `gqn-fast` command line: `gqn-fast data ...`, `gqn-fast train ...`, `gqn-fast eval ...`.

Every command's arguments are in gqn_fast/arguments.py, which imports nothing heavy: the
module that runs a command (and torch) is imported only when it runs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

from gqn_fast.errors import UserError

_NOT_GIVEN = object()


def _nothing_to_show(default) -> bool:
    return default is None or default is False or default == ""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless there is none to show (None, an off
    flag) or the help already says what it is."""

    def _get_help_string(self, action):
        if _nothing_to_show(action.default) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentsError(UserError):
    """A command line the parser cannot read; `prog` names the command ("gqn-fast train")."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with DefaultsFormatter; add_subparsers makes sub-parsers of the
    parent's class, so every command's help shows its defaults. Its errors are ArgumentsError
    (one line, exit 1 in `main`) instead of the usage and exit 2, and a command's namespace
    says which options its command line gave (`given_options`, their dests: a resume takes
    the others from the run)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        self.flags = []  # every option string, for "did you mean"
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and not _nothing_to_show(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"  # argparse shows no default without a help
        action = super().add_argument(*args, **kwargs)
        self.flags += action.option_strings
        return action

    def error(self, message):
        choice = _INVALID_CHOICE.search(message)
        if choice:
            message += _did_you_mean(choice["value"], [c.strip(" '") for c in choice["choices"].split(",")])
        raise ArgumentsError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if self.get_default("run") is None:  # not a command: a parser of commands
            return namespace, extras
        flags = [arg for arg in extras if arg.startswith("-")]
        if flags:
            flag = flags[0].split("=")[0]
            self.error(f"unrecognized argument {flag}" + _did_you_mean(flag, self.flags))
        if extras:
            self.error(f"unexpected argument {extras[0]!r}")
        # Parsed again over a namespace of markers, which argparse leaves where no option was given.
        marked, _ = super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(vars(namespace), _NOT_GIVEN)))
        namespace.given_options = frozenset(k for k, v in vars(marked).items() if v is not _NOT_GIVEN)
        return namespace, extras


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<value>[^']*)' \(choose from (?P<choices>.*)\)")


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


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
    """`gqn-fast ARGV...`; returns the exit code. Without `argv`, the program itself (the console
    script, `python -m gqn_fast`): its command line is sys.argv, and its process's C heap gives
    freed memory back as the bench measures memory (gqn_fast.malloc); from Python with `argv`,
    the process is left as it is."""
    if argv is None:
        from gqn_fast.malloc import limit_malloc_caching

        limit_malloc_caching()
    try:
        args = build_parser().parse_args(argv)
    except ArgumentsError as error:
        print(f"{error.prog}: error: {error}", file=sys.stderr)
        return 1
    command = " ".join(part for part in ("gqn-fast", args.command, getattr(args, "data_command", None)) if part)
    try:
        return int(command_function(args.run)(args) or 0)
    except (UserError, OSError) as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # workers ignore SIGINT (gqn_fast.data.workers): this is the one line
        print(f"{command}: interrupted: {stop if str(stop) else 'nothing written'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
