"""The one error path of the command line: errors a user can cause and fix.

Every such error is a UserError (keeping its other base too: a DatasetFormatError is still a
ValueError), naming the argument or file and what is wrong with it; `gqn-fast` prints it on one
line, `gqn-fast <command>: error: <message>`, and exits with code 1, as it does for an OSError
(a file missing, a disk full). Anything else is a bug and keeps its traceback. A Ctrl-C ends
in one line too (Interrupted), with exit code 130. This module
imports nothing of the project, so every module can import it.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix: a bad argument, or a file that cannot be used as given."""


class UsageError(UserError, ValueError):
    """A bad argument (of a command, or of a function a user calls with it): a ValueError too."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C after which a command has put its files in order: the message says what was
    kept. `gqn-fast` prints it in one line, `gqn-fast <command>: interrupted: <message>`, and
    exits with code 130 (a plain KeyboardInterrupt: "nothing written")."""


def check_int(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    """`value` of the option `name` (e.g. "--scenes") if it is an int (not a bool) with
    low <= value <= high, else a UsageError: "--scenes: expected an int >= 1, got 0"."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        expected = f"an int from {low} to {high}" if high is not None else f"an int >= {low}"
        raise UsageError(f"{name}: expected {expected}{why}, got {value}")
    return value


def check_count(name: str, value, low: int = 1) -> int:
    """A count that must be an int (not a bool) >= low, 1 or 0: "--keep: expected a positive int, got 0"."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        kind = {1: "a positive int", 0: "a non-negative int"}[low]
        raise UsageError(f"{name}: expected {kind}, got {value!r}")
    return value
