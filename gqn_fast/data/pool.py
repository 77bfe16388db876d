"""The process pool of the data commands (rendering the built-in sets, converting DeepMind's):
workers that leave Ctrl-C to the parent and exit with it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time


def worker_pool(processes: int, initializer=None, initargs: tuple = ()):
    """A multiprocessing Pool (fork where there is one, as DataLoader: spawn would re-run an
    unguarded __main__). Its workers ignore SIGINT, which a terminal sends to every process of
    the job: the parent alone stops on Ctrl-C, and leaving its `with` block terminates them
    without a traceback of theirs. `initializer(*initargs)` then runs in each worker."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # SIGINT blocked while the workers start: a Ctrl-C then waits for the parent, and no
    # worker meets one before it ignores them.
    masked = _block_sigint()
    try:
        return context.Pool(processes, initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))
    finally:
        if masked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)


def _block_sigint():
    """The signal mask before SIGINT was blocked, or None where there are no signal masks."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _start_worker(parent: int, initializer, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (kill -9 leaves no one to stop it) exits within half a second."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
