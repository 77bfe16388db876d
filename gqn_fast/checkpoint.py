"""Training checkpoints: written to survive a crash at any moment (a temporary file, fsynced,
then renamed over: a rename is atomic on POSIX; the last few kept), and read without running
code: torch.load(weights_only=True), whose unpickler builds tensors and plain values (dicts,
lists, tuples, strings, numbers) and refuses anything else. So a checkpoint holds only those:
the model's and optimizer's state_dicts, step, data position, config, training settings, and
the RNG states as tensors and lists (format version 2). Version 1 kept NumPy's RNG state as an
ndarray; it still loads, with exactly NumPy's array reconstruction allowed for that one call.
What is read is checked before use: a file that is none, or lacks a piece, is one
CheckpointError naming the file and the problem."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from gqn_fast.config import GQNConfig
from gqn_fast.errors import UserError

FORMAT_VERSION = 2
ZIP_MAGIC = b"PK\x03\x04"  # how a file torch.save wrote begins
READABLE_VERSIONS = (1, 2)
NAME = re.compile(r"step-(\d+)\.pt$")
TEMPORARY = re.compile(r"^\.step-\d+\.pt\.tmp-\d+$")  # what atomic_save writes before its rename


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, or made for another configuration."""


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never part."""
    atomic_write(path, lambda f: f.write(data))


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, fsynced, then renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file is never left to be mistaken for one
        raise
    # The rename itself must reach the disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and plain values (what weights_only loads)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        np.random.set_state(
            (
                numpy_state["kind"],
                np.array(numpy_state["keys"], np.uint32),
                numpy_state["pos"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
    else:  # format version 1: NumPy's own tuple
        np.random.set_state(numpy_state)
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the half-written files a kill during a checkpoint write leaves; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if TEMPORARY.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write step-<step>.pt atomically, then delete all but the newest `keep`."""
    path = Path(folder) / f"step-{step:08d}.pt"
    atomic_save({"version": FORMAT_VERSION, "step": step, **state}, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _numpy_array_globals() -> list:
    """What unpickling a NumPy array takes, under the names NumPy 1 and 2 pickle it by: only
    for version 1 checkpoints, whose NumPy RNG state is an ndarray. Safe to allow: it builds an
    ndarray from its shape, dtype and bytes (an object array's items go through the same
    restricted unpickler)."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed = [
        np.ndarray,
        np.dtype,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
    ]
    dtype_class = getattr(getattr(np, "dtypes", None), "UInt32DType", None)  # pickled with NumPy >= 1.25
    if dtype_class is not None:
        allowed.append(dtype_class)
    return allowed


def _refusal(error: Exception) -> str:
    """The line of torch's weights_only refusal that names what was refused (the rest of the
    message suggests weights_only=False, which this project never does)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(error).__name__])[0].rstrip(".")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's dict, read with weights_only=True and checked: its version, step, config and
    model are there and of the right kinds (a training checkpoint's other pieces: `check_resumable`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not is_zip:
        raise CheckpointError(f"{path}: not a gqn-fast checkpoint (not a PyTorch zip file)")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values, which "
            f"cannot be opened without running code from the file ({_refusal(error)})"
        ) from None
    except Exception as error:  # torch raises several types for a damaged zip
        raise CheckpointError(f"{path}: a damaged checkpoint (truncated?): {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        version = state.get("version") if isinstance(state, dict) else None
        raise CheckpointError(
            f"{path}: not a gqn-fast checkpoint of format version {' or '.join(map(str, READABLE_VERSIONS))}"
            + (f" (version {version!r})" if version is not None else "")
        )
    _expect(path, state, {"step": int, "model": dict, "config": dict})
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise CheckpointError(f"{path}: model: expected a mapping of parameter names to tensors")
    return state


def check_resumable(state: dict, path: Path) -> None:
    """The pieces a resume reads besides the model: optimizer, RNG states, data position, settings."""
    _expect(path, state, {"optimizer": dict, "rng": dict, "data": dict, "train": dict})
    _expect(path, state["data"], {"epoch": int, "batch": int}, "data.")
    _expect(path, state["rng"], {"torch": torch.Tensor, "numpy": (dict, tuple), "python": (dict, tuple)}, "rng.")
    if "window" in state:  # the log window under way (absent before this field)
        _expect(path, state, {"window": dict})
        _expect(path, state["window"], {"steps": int, "sums": (torch.Tensor, type(None))}, "window.")


def _expect(path: Path, state: dict, kinds: dict, prefix: str = "") -> None:
    for key, kind in kinds.items():
        if key not in state:
            raise CheckpointError(f"{path}: not a complete gqn-fast checkpoint: no {prefix}{key!r}")
        value = state[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(
                f"{path}: {prefix}{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
            )


def check_compatible(state: dict, config: GQNConfig, path: Path) -> None:
    """Refuse a checkpoint made for another model configuration, naming the field that differs."""
    saved = {**GQNConfig().to_dict(), **state["config"]}  # a field newer than the checkpoint: its default
    wanted = config.to_dict()
    for field, value in wanted.items():
        if saved.get(field) != value:
            raise CheckpointError(
                f"{path}: made for {field}={saved.get(field)!r}, but this run has {field}={value!r}; "
                f"use another --out folder, or the checkpoint's configuration"
            )
