"""Worker processes of the data commands and loaders: how they start and how they end. Plain
Python (no torch)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_context():
    """fork where there is one (as torch's DataLoader): spawn would re-run an unguarded __main__."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def worker_init(parent: int) -> None:
    """A worker's start: Ctrl-C goes to the parent, which stops the pool; and it exits with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (kill -9 leaves no one to stop it) exits within half a second."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
