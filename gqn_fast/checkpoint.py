"""Checkpoints that survive a crash at any moment: written to a temporary file, fsynced, then
renamed over (a rename is atomic on POSIX), and the last few kept."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from gqn_fast.config import GQNConfig

FORMAT_VERSION = 1
NAME = re.compile(r"step-(\d+)\.pt$")
TEMPORARY = re.compile(r"^\.step-\d+\.pt\.tmp-\d+$")  # what atomic_save writes before its rename


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or made for another configuration."""


def atomic_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
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
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
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


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a gqn-fast checkpoint of format version {FORMAT_VERSION}")
    return state


def check_compatible(state: dict, config: GQNConfig, path: Path) -> None:
    """Refuse a checkpoint made for another model configuration, naming the field that differs."""
    saved = state["config"]
    wanted = config.to_dict()
    for field, value in wanted.items():
        if saved.get(field) != value:
            raise CheckpointError(
                f"{path}: made for {field}={saved.get(field)!r}, but this run has {field}={value!r}; "
                f"use another --out folder, or the checkpoint's configuration"
            )


def export_model(state: dict, path: Path, half: bool = False, builtin: dict | None = None) -> Path:
    """Write a published model: the parameters (fp16 if `half`), config, step and training
    settings of a training checkpoint, without optimizer or RNG state (it cannot be resumed).

    builtin: {"family", "seed", "holdout"} of a built-in dataset the model trained on; then the
    training settings name it instead of a local folder, and `eval`, `sample` and `analyze`
    regenerate its test split on any machine (scenes are deterministic from the seed).
    """
    model = {
        name: t.half() if half and t.is_floating_point() else t.clone() for name, t in state["model"].items()
    }
    train = dict(state.get("train", {}))
    if builtin is not None:
        train.update(data=None, builtin=dict(builtin))
    published = dict(version=FORMAT_VERSION, step=state["step"], model=model, config=state["config"],
                     train=train, exported=True)
    atomic_save(published, Path(path))
    return Path(path)
