"""The settings of a training run (TrainArgs), which of them change its result, and their
checks. Plain Python: the command line's parser (gqn_fast/arguments.py) reads the defaults
without loading torch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from gqn_fast.config import PRESETS
from gqn_fast.errors import UsageError, check_count
from gqn_fast.models import IMPLS


@dataclasses.dataclass
class TrainArgs:
    data: str | None = None
    dataset: str | None = None  # the DeepMind set a downloaded --data folder holds, where it cannot be told
    skip_corrupt: bool = False  # leave out a download's damaged records
    builtin_scenes: int = 2000
    preset: str = "small"
    steps: int = 2000
    sigma_steps: int = 200_000
    batch: int = 16
    max_context: int = 5
    impl: str = "fast"
    precision: str = "fp32"
    compile: bool = False
    out: str = "runs/gqn"
    resume: bool = False
    allow_change: str = ""
    seed: int = 0
    workers: int | None = None  # None: auto_workers' choice for the data and the device
    log_every: int = 10
    image_every: int = 500
    checkpoint_every: int = 250
    keep: int = 3
    device: str | None = None
    max_minutes: float | None = None
    cuda_graphs: bool = True  # on one CUDA device, the step replayed from CUDA graphs (gqn_fast.train_step)
    threads: int | None = None  # CPU threads for torch's ops; None: torch's default, one per core


def _data_setting(args: dict) -> str:
    if args.get("data"):
        return str(Path(args["data"]).resolve())  # older runs stored the path as given
    return f"the built-in rooms set of {args.get('builtin_scenes')} scenes"


# The settings that change what a run computes; a resume must keep them unless allowed to change
# (flag name -> its value in a TrainArgs dict; "data" covers --data and --builtin-scenes).
RESULT_SETTINGS = {
    "data": _data_setting,
    "preset": lambda a: a.get("preset"),
    "sigma-steps": lambda a: a.get("sigma_steps"),
    "batch": lambda a: a.get("batch"),
    "max-context": lambda a: a.get("max_context"),
    "impl": lambda a: a.get("impl"),
    "precision": lambda a: a.get("precision"),
    "seed": lambda a: a.get("seed"),
}
CHOICES = {"preset": tuple(PRESETS), "impl": IMPLS, "precision": ("fp32", "bf16")}


def check_args(args: TrainArgs) -> None:
    """UsageError naming the first argument that cannot be used."""
    for name in (
        "steps",
        "batch",
        "sigma_steps",
        "builtin_scenes",
        "max_context",
        "log_every",
        "image_every",
        "checkpoint_every",
        "keep",
    ):
        check_count(f"--{name.replace('_', '-')}", getattr(args, name))
    check_count("--seed", args.seed, 0)
    if args.workers is not None:
        check_count("--workers", args.workers, 0)
    for name, choices in CHOICES.items():
        if getattr(args, name) not in choices:
            raise UsageError(f"--{name}: expected one of {', '.join(choices)}, got {getattr(args, name)!r}")
    if args.threads is not None:
        check_count("--threads", args.threads)
    minutes = args.max_minutes
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not math.isfinite(minutes) or minutes <= 0
    ):
        raise UsageError(f"--max-minutes: expected a positive number of minutes, got {minutes!r}")
    unknown = sorted(set(allowed_changes(args)) - set(RESULT_SETTINGS))
    if unknown:
        raise UsageError(
            f"--allow-change: unknown setting {', '.join(unknown)}; the settings are {', '.join(RESULT_SETTINGS)}"
        )


def auto_workers(decodes: bool, on_gpu: bool, cores: int, ranks_on_host: int = 1) -> int:
    """The loader's workers when --workers is not given, for data whose batches are decoded
    (a download: processes) or read (a converted folder: threads).

    On the CPU a step takes far longer than any batch: one decoding process for a download, and
    a converted folder read in the loop. On a GPU a graphed step takes milliseconds: a download
    gets one process per core but one (the training loop's), shared by the ranks on the host, at
    most 8 (each decodes about 2,000 scenes/s); a converted folder 2 threads, which keep its
    reads off the loop."""
    if not on_gpu:
        return 1 if decodes else 0
    if not decodes:
        return 2
    return max(1, min(8, cores // ranks_on_host - 1))


def allowed_changes(args: TrainArgs) -> list[str]:
    return [name.strip().replace("_", "-") for name in args.allow_change.split(",") if name.strip()]


# Where the run is and how to resume it: never taken from the run's saved settings.
NOT_FROM_RUN = ("out", "resume", "allow_change")
DATA_FIELDS = ("data", "builtin_scenes")  # together they name the data: given, or taken, as one


def settings_from_run(args: TrainArgs, saved: dict, given: frozenset[str] | None) -> TrainArgs:
    """`args` with every setting the command line did not give (`given`: TrainArgs field names;
    None: all given, as a TrainArgs from Python is) taken from the run's saved `saved`, so that
    `--resume` alone continues the run as it was."""
    if given is None:
        return args
    keep = set(given) | set(NOT_FROM_RUN)
    if keep & set(DATA_FIELDS):
        keep |= set(DATA_FIELDS)
    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    return dataclasses.replace(args, **{k: v for k, v in saved.items() if k in fields and k not in keep})


def describe_settings(args: TrainArgs) -> str:
    """The settings that change a run's result, in words: "small preset, batch 8, ..."."""
    now = dataclasses.asdict(args)
    rest = [f"{name} {read(now)}" for name, read in RESULT_SETTINGS.items() if name not in ("preset", "data")]
    return ", ".join([f"{args.preset} preset", *rest]) + f"; data: {_data_setting(now)}"


def check_resume_settings(saved: dict, args: TrainArgs, path: Path) -> None:
    """Refuse to resume with a setting that changes the result unless --allow-change names it."""
    allowed = allowed_changes(args)
    now = dataclasses.asdict(args)
    for name, read in RESULT_SETTINGS.items():
        before, after = read(saved), read(now)
        if before != after and name not in allowed:
            raise UsageError(
                f"--resume: the run was trained with --{name} {before} ({path}), this command has "
                f"--{name} {after}; resume with the run's setting, or pass --allow-change {name} to change it"
            )
