"""A tiny built-in dataset and a tiny model's checkpoint, as `gqn-fast train` writes them, for
the tests of the commands that read checkpoints (eval, sample, analyze)."""

import dataclasses
from pathlib import Path

import torch
from helpers import tiny_config

from gqn_fast.checkpoint import rng_state, save_checkpoint
from gqn_fast.model import GQN
from gqn_fast.train import TrainArgs


def make_tiny_dataset(root: Path, scenes: int = 12, holdout: str | None = None) -> Path:
    from gqn_fast.data.builtin import make_dataset

    return make_dataset(
        root, "rooms", scenes=scenes, seed=3, workers=1, progress=False, holdout=holdout, test_fraction=0.5
    )


def make_tiny_checkpoint(run: Path, data: Path, step: int = 7, **config) -> Path:
    """run/checkpoints/step-<step>.pt of a randomly initialised tiny model, in train's format."""
    torch.manual_seed(0)
    config = tiny_config(**config)
    model = GQN(config)
    optimizer = torch.optim.Adam(model.parameters())
    args = TrainArgs(data=str(data), out=str(run), steps=step)
    return save_checkpoint(
        Path(run) / "checkpoints",
        step,
        dict(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            rng=rng_state(),
            data=dict(epoch=0, batch=step),
            config=config.to_dict(),
            train=dataclasses.asdict(args),
        ),
        keep=1,
    )
