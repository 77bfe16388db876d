"""Model files: what `eval`, `sample` and `analyze` open and what `export` publishes, opened
without running any code they might hold.

Two kinds, told apart by their first bytes, not by their names:
- a published model (`gqn-fast export`; models/NAME/model.safetensors): the parameters in the
  safetensors format (a JSON header and raw tensor bytes, nothing executable), fp16 or fp32,
  with JSON metadata: `config` (the model), `step`, `dataset` (the built-in generator that
  makes its data, or the folder it trained on) and `training` (its settings, for the record).
  A folder holding model.safetensors stands for that file, as Hugging Face model folders do.
- a training checkpoint (`gqn-fast train`; runs/NAME/checkpoints/step-N.pt): a PyTorch zip
  file, read by checkpoint.load_checkpoint with torch.load(weights_only=True).

Everything is checked before use: the metadata's keys and types, the config, each tensor's
name, shape and dtype against the model the config builds, and that every value is finite; a
problem is one CheckpointError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gqn_fast.checkpoint import ZIP_MAGIC, CheckpointError, atomic_write_bytes, load_checkpoint
from gqn_fast.config import GQNConfig
from gqn_fast.schedules import pixel_sigma
from gqn_fast.train_settings import TrainArgs

PUBLISHED_NAME = "model.safetensors"  # in a model folder
FORMAT = "gqn-fast model"
FORMAT_VERSION = 1
METADATA_KEYS = ("format", "format_version", "config", "step", "dataset", "training")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_MAGIC_OFFSET = 8  # a little-endian u64 header length, then the JSON header: "{"


@dataclass(frozen=True)
class ModelFile:
    """A model file, checked: what a command needs to rebuild the model and find its data."""

    path: Path
    config: GQNConfig
    params: dict  # parameter name -> tensor, as state_dict() names them
    step: int
    dataset: dict  # {"builtin": {"family", "seed", "holdout", "scenes"}} or {"folder": path}
    training: dict  # the training settings (TrainArgs' fields), as the run had them


def dataset_description(train: dict) -> dict:
    """What a training run read, from its settings: the folder, or the built-in generator."""
    if train.get("data"):
        return {"folder": str(train["data"])}
    builtin = train.get("builtin") or {}  # files exported before the safetensors format named it here
    return {
        "builtin": {
            "family": builtin.get("family", "rooms"),
            "seed": builtin.get("seed", 0),
            "holdout": builtin.get("holdout"),
            "scenes": train.get("builtin_scenes", TrainArgs.builtin_scenes),
        }
    }


def read_model_file(path) -> ModelFile:
    """Open a published model or a training checkpoint (see the module's docstring)."""
    path = Path(path)
    if path.is_dir():
        if not (path / PUBLISHED_NAME).is_file():
            raise CheckpointError(f"{path}: a folder without {PUBLISHED_NAME}; give a model file or a model folder")
        path = path / PUBLISHED_NAME
    try:
        with open(path, "rb") as f:
            head = f.read(SAFETENSORS_MAGIC_OFFSET + 1)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from None
    if head.startswith(ZIP_MAGIC):
        return _from_checkpoint(path)
    if len(head) > SAFETENSORS_MAGIC_OFFSET and head[SAFETENSORS_MAGIC_OFFSET:] == b"{":
        return _from_safetensors(path)
    raise CheckpointError(
        f"{path}: not a gqn-fast model (a .safetensors file from `gqn-fast export`) "
        "nor a training checkpoint (a PyTorch zip file from `gqn-fast train`)"
    )


def _from_checkpoint(path: Path) -> ModelFile:
    state = load_checkpoint(path)
    train = state.get("train", {})
    return _checked(path, state["config"], state["model"], state["step"], dataset_description(train), train)


def _from_safetensors(path: Path) -> ModelFile:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            params = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # the Rust reader's SafetensorError, or an OSError
        raise CheckpointError(f"{path}: a damaged .safetensors file (truncated?): {error}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: a .safetensors file, but not a gqn-fast model (its metadata has no "
            f"format {FORMAT!r}; a model from elsewhere needs its config to be rebuilt)"
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: gqn-fast model format {metadata.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if unknown or missing:
        raise CheckpointError(
            f"{path}: metadata keys {'missing ' + str(missing) if missing else ''}"
            f"{' and ' if unknown and missing else ''}{'unknown ' + str(unknown) if unknown else ''}"
        )
    values = {}
    for key in ("config", "step", "dataset", "training"):
        try:
            values[key] = json.loads(metadata[key])
        except ValueError as error:
            raise CheckpointError(f"{path}: metadata {key!r} is not JSON ({error})") from None
    return _checked(path, values["config"], params, values["step"], values["dataset"], values["training"])


def _checked(path: Path, config, params, step, dataset, training) -> ModelFile:
    """The pieces of a model file, each checked, as a ModelFile; CheckpointError naming the first problem."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config: expected a JSON object, got {type(config).__name__}")
    try:
        config = GQNConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: config: {error}") from None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: step: expected a non-negative int, got {step!r}")
    _check_dataset(path, dataset)
    _check_training(path, training)
    _check_params(path, config, params)
    return ModelFile(path, config, params, step, dataset, training)


def _check_dataset(path: Path, dataset) -> None:
    if isinstance(dataset, dict) and set(dataset) == {"folder"} and isinstance(dataset["folder"], str):
        return
    builtin = dataset.get("builtin") if isinstance(dataset, dict) and set(dataset) == {"builtin"} else None
    types = {"family": (str,), "seed": (int,), "holdout": (str, type(None)), "scenes": (int,)}
    if (
        isinstance(builtin, dict)
        and set(builtin) == set(types)
        and all(isinstance(builtin[k], t) and not isinstance(builtin[k], bool) for k, t in types.items())
    ):
        return
    raise CheckpointError(
        f'{path}: dataset: expected {{"folder": path}} or {{"builtin": {{family, seed, holdout, '
        f"scenes}}}}, got {json.dumps(dataset)[:200]}"
    )


def _check_training(path: Path, training) -> None:
    if not isinstance(training, dict):
        raise CheckpointError(f"{path}: training settings: expected a JSON object, got {type(training).__name__}")
    known = {f.name for f in dataclasses.fields(TrainArgs)} | {"builtin"}
    unknown = sorted(set(training) - known)
    if unknown:
        raise CheckpointError(f"{path}: training settings: unknown keys {unknown}")
    sigma_steps = training.get("sigma_steps", TrainArgs.sigma_steps)
    if not isinstance(sigma_steps, int) or isinstance(sigma_steps, bool) or sigma_steps < 1:
        raise CheckpointError(f"{path}: training settings: sigma_steps: expected a positive int, got {sigma_steps!r}")


def _check_params(path: Path, config: GQNConfig, params) -> None:
    """Names, shapes and dtypes as the model the config builds has them; every value finite."""
    from gqn_fast.models import build_model

    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in params.items()
    ):
        raise CheckpointError(f"{path}: the parameters: expected a mapping of names to tensors")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = build_model(config).state_dict()
    missing, unexpected = sorted(expected.keys() - params.keys()), sorted(params.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the parameters do not fit its config: "
            f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    for name, want in expected.items():
        got = params[name]
        if got.shape != want.shape:
            raise CheckpointError(f"{path}: {name}: shape {list(got.shape)}, its config makes {list(want.shape)}")
        if got.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {name}: dtype {got.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{path}: {name}: holds NaN or infinite values")


def write_published(path, model_file: ModelFile, half: bool = False) -> Path:
    """`gqn-fast export`: the parameters (fp16 if `half`) and metadata as one .safetensors file."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {
        name: (t.half() if half and t.is_floating_point() else t).detach().cpu().contiguous().clone()
        for name, t in model_file.params.items()
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model_file.config.to_dict()),
        "step": json.dumps(model_file.step),
        "dataset": json.dumps(model_file.dataset),
        "training": json.dumps(model_file.training),
    }
    atomic_write_bytes(save(tensors, metadata=metadata), path)
    return path


def pixel_sigma_of(model_file: ModelFile) -> float:
    """The pixel sigma the model had reached at its step (the paper's annealing)."""
    return pixel_sigma(model_file.step, model_file.training.get("sigma_steps", TrainArgs.sigma_steps))
