"""The one error path of the command line: errors a user can cause and fix.

A command raises UsageError (or one of USER_ERRORS) naming the argument or file and what is
wrong with it; `gqn-fast` prints it on one line, `gqn-fast <command>: error: <message>`, and
exits with code 1, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """A bad command-line argument, or a file that cannot be used as given."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported in one line: UsageError and the library's own input errors."""
    from gqn_fast.checkpoint import CheckpointError
    from gqn_fast.data.format import DatasetFormatError
    from gqn_fast.data.tfrecord import CorruptRecordError
    from gqn_fast.train import TrainingDiverged

    return (UsageError, CheckpointError, DatasetFormatError, CorruptRecordError, TrainingDiverged,
            FileExistsError, FileNotFoundError, NotADirectoryError)
