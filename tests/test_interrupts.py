"""Ctrl-C outside the training loop (whose own stop is in tests/test_train.py): one line saying
what was kept, exit code 130, the workers stopped without tracebacks of their own, and nothing
partial left. A real SIGINT to the whole process group, as a terminal sends it."""

import os
import sys

from helpers import interrupt_when

GQN_FAST = [sys.executable, "-m", "gqn_fast"]


def assert_one_line(err, expected):
    """stderr: progress bars (carriage returns), then the one line; no traceback of any process."""
    assert "Traceback" not in err and "Process " not in err, err
    assert err.replace("\r", "\n").strip().splitlines()[-1] == expected, err


def test_ctrl_c_while_data_make_renders(tmp_path):
    out = tmp_path / "rooms"
    argv = [*GQN_FAST, "data", "make", "rooms", "--scenes", "4000", "--workers", "2", "--quiet", "--out", str(out)]
    # Working: the split's arrays are open in the folder it builds, and the workers render into them.
    code, stdout, err = interrupt_when(argv, lambda _: list(tmp_path.glob("rooms.partial-*/test/images.npy")))
    assert (code, stdout) == (130, "")
    assert_one_line(
        err, f"gqn-fast data make: interrupted: nothing kept: {out} was not written (its partial files are removed)"
    )
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_train_makes_its_builtin_dataset(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    argv = [*GQN_FAST, "train", "--builtin-scenes", "4000", "--steps", "1", "--device", "cpu", "--out", str(run)]
    env = {**os.environ, "GQN_FAST_CACHE": str(cache)}
    code, stdout, err = interrupt_when(argv, lambda _: list(cache.glob("rooms-4000-0.partial-*/test/images.npy")), env)
    assert (code, stdout) == (130, "")
    set_folder = cache / "rooms-4000-0"
    assert_one_line(
        err, f"gqn-fast train: interrupted: nothing kept: {set_folder} was not written (its partial files are removed)"
    )
    assert [p.name for p in cache.iterdir()] == [".rooms-4000-0.lock"] and not run.exists()
