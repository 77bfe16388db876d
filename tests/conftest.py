"""Shared test settings, and which process runs which test.

Markers (pyproject.toml): `cuda` tests need a GPU and are skipped without one; `interpreter`
tests run Triton's CPU interpreter, which is chosen when Triton is imported, so they run in a
pytest process of their own with TRITON_INTERPRET=1 (test_kernels_interpreter.py starts it),
and every other test runs without it. GQN_TEST_TIMEOUT=N fails a test that runs past N s;
GQN_REPORT_FAILURES_AT_ONCE=1 prints each failure's traceback the moment it fails (a run killed
by an outer time limit, as on a rented GPU, otherwise loses pytest's end-of-run report).
"""

import os
import signal

import pytest
import torch
from hypothesis import HealthCheck, settings

# `ci`: bounded and without deadlines (CPU timing varies; the Triton interpreter is slow).
# `dev`: more examples, for a local hunt. Pick with --hypothesis-profile or HYPOTHESIS_PROFILE.
settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Node ids of the interpreter tests this (non-interpreter) run collected and left to the sub-run.
INTERPRETER_TESTS = pytest.StashKey[list]()


def _interpreter_process() -> bool:
    from gqn_fast.kernels.utils import interpreter_enabled  # imported by the kernel tests already

    return interpreter_enabled()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a GPU (torch.cuda.is_available() is False)")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)
    marked = [item for item in items if item.get_closest_marker("interpreter")]
    interpreter = bool(marked) and _interpreter_process()
    keep = [item for item in items if bool(item.get_closest_marker("interpreter")) == interpreter]
    left = [item for item in items if bool(item.get_closest_marker("interpreter")) != interpreter]
    config.stash[INTERPRETER_TESTS] = [] if interpreter else [item.nodeid for item in marked]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """GQN_TEST_TIMEOUT=N: a test still running after N s fails with TimeoutError (a hang in
    native code is left to the caller's overall timeout: bench/gpu_check.py has one)."""
    seconds = int(os.environ.get("GQN_TEST_TIMEOUT", "0") or 0)
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid}: still running after {seconds} s (GQN_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_logreport(report):
    """GQN_REPORT_FAILURES_AT_ONCE=1: a failure's node id and traceback, printed when it happens
    (also by pytest-xdist's controller, which receives every worker's reports)."""
    if report.failed and os.environ.get("GQN_REPORT_FAILURES_AT_ONCE") == "1":
        print(f"\n=== FAILED {report.nodeid} ({report.when}) ===\n{report.longreprtext[-4000:]}\n", flush=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill every new torch.empty / empty_like with NaN, so an element a kernel forgets to write fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def make(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return make

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    yield
