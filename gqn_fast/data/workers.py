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


def worker_pool(processes: int, initializer=None, initargs: tuple = ()):
    """A multiprocessing Pool whose workers leave Ctrl-C to the parent (a terminal sends SIGINT to
    every process of the job): the parent alone stops, and leaving its `with` block terminates
    them without a traceback of theirs. `initializer(*initargs)` then runs in each worker."""
    # SIGINT blocked while the workers start: no worker meets one before it ignores them.
    masked = _block_sigint()
    try:
        return process_context().Pool(
            processes, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs)
        )
    finally:
        if masked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)


def worker_init(parent: int) -> None:
    """A worker's start: Ctrl-C goes to the parent, which stops the pool; and it exits with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _block_sigint():
    """The signal mask before SIGINT was blocked, or None where there are no signal masks."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _start_worker(parent: int, initializer, initargs: tuple) -> None:
    worker_init(parent)
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (kill -9 leaves no one to stop it) exits within half a second."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
