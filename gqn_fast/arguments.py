"""Every command's arguments, imported by gqn_fast.cli to build the parser: nothing here
imports torch or what needs it, so that `gqn-fast ... --help` answers at once. A command names
the function that runs it as "module:function" (`run`), imported only when it runs.
"""

from __future__ import annotations

import argparse

from gqn_fast.data.catalog import (
    ALGEBRA_PROPERTIES,
    DEEPMIND_DATASETS,
    DEFAULT_SCENES,
    DEFAULT_SEED,
    HOLDOUTS,
    TEST_FRACTION,
)
from gqn_fast.train_settings import CHOICES, RESULT_SETTINGS, TrainArgs


def add_common_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument(
        "checkpoint",
        help="a published model (model.safetensors or its folder, from `gqn-fast export`) "
        "or a training checkpoint (runs/NAME/checkpoints/step-*.pt)",
    )
    p.add_argument(
        "--data",
        help="dataset folder: converted, or DeepMind's download as it is (default: the one the checkpoint trained on)",
    )
    add_deepmind_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (views, prior samples)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU if there is one)")


def add_deepmind_arguments(p: argparse.ArgumentParser, skip_corrupt: bool = False) -> None:
    """--dataset (and --skip-corrupt) for a command that reads DeepMind's download as it is."""
    p.add_argument(
        "--dataset",
        choices=sorted(DEEPMIND_DATASETS),
        help="which DeepMind set a downloaded --data folder holds, where its name and files do not say",
    )
    if skip_corrupt:
        p.add_argument(
            "--skip-corrupt",
            action="store_true",
            help="leave out a download's damaged records (and say how many) instead of stopping at the first",
        )


def register_data(subparsers) -> None:
    data = subparsers.add_parser("data", help="make, convert and look at datasets")
    commands = data.add_subparsers(dest="data_command", required=True)

    make = commands.add_parser("make", help="render a built-in dataset (train and test splits)")
    make.add_argument("family", choices=["rooms", "shepard_metzler"])
    make.add_argument("--scenes", type=int, default=DEFAULT_SCENES, help="scenes in both splits together")
    make.add_argument("--out", required=True, help="dataset folder to create")
    make.add_argument("--seed", type=int, default=DEFAULT_SEED)
    make.add_argument("--parts", type=int, choices=[5, 7], help="cubes per shepard_metzler shape (default 5)")
    make.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    make.add_argument("--workers", type=int, help="rendering processes (default: one per core)")
    make.add_argument("--device", help="render on this torch device, e.g. cuda (default: the CPU)")
    make.add_argument(
        "--holdout",
        choices=sorted(HOLDOUTS),
        help="a combination the train split never shows (rooms only), for compositionality tests",
    )
    make.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(run="gqn_fast.data.commands:_make")

    convert = commands.add_parser("convert-deepmind", help="convert DeepMind's gqn-datasets TFRecords")
    convert.add_argument("src", help="folder holding <dataset>/train and <dataset>/test (or train/ and test/)")
    convert.add_argument("out", help="dataset folder to write (a stopped conversion resumes)")
    convert.add_argument("--dataset", required=True, choices=sorted(DEEPMIND_DATASETS))
    convert.add_argument("--splits", nargs="+", choices=["train", "test"], default=["train", "test"])
    convert.add_argument("--workers", type=int, help="files converted in parallel (default: one per core)")
    convert.add_argument("--skip-corrupt", action="store_true", help="skip and report damaged records")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run="gqn_fast.data.commands:_convert")

    show = commands.add_parser("show", help="write a PNG grid of scenes and their views")
    show.add_argument("dir", help="dataset folder: converted, or DeepMind's download as it is")
    show.add_argument(
        "--out",
        help="PNG to write (default: DIR/preview-<split>.png; for a download, preview-<dataset>-<split>.png "
        "in the current folder: nothing is written into a download)",
    )
    add_deepmind_arguments(show)
    show.add_argument("--split", choices=["train", "test"], default="train")
    show.add_argument("--scenes", type=int, default=8)
    show.add_argument("--views", type=int, help="views per scene (default: all, at most 16)")
    show.add_argument("--first", type=int, default=0, help="index of the first scene")
    show.set_defaults(run="gqn_fast.data.commands:_show")


def register_train(subparsers) -> None:
    defaults = TrainArgs()
    p = subparsers.add_parser("train", help="train a GQN (on the built-in rooms set unless --data)")
    p.add_argument(
        "--data",
        help="dataset folder: converted (gqn-fast data make / convert-deepmind), or DeepMind's download as it is "
        "(train/ and test/ of its TFRecords, indexed once into the cache folder); default: the built-in rooms "
        "set, generated on first use",
    )
    add_deepmind_arguments(p, skip_corrupt=True)
    p.add_argument(
        "--builtin-scenes",
        type=int,
        default=defaults.builtin_scenes,
        help="size of the built-in rooms set used without --data (made once, then cached)",
    )
    p.add_argument(
        "--preset",
        choices=CHOICES["preset"],
        default=defaults.preset,
        help="model size: small (trains on a CPU) or paper (Eslami et al. 2018); jump-small: Consistent GQN "
        "(one latent per scene) at the small size",
    )
    p.add_argument(
        "--steps", type=int, default=defaults.steps, help="train until this step (counted from the run's start)"
    )
    p.add_argument("--batch", type=int, default=defaults.batch, help="scenes per step (per process)")
    p.add_argument(
        "--sigma-steps",
        type=int,
        default=defaults.sigma_steps,
        help="steps over which the pixel sigma anneals from 2.0 to 0.7 (the paper: 200000; "
        "a short run learns little at sigma 2)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=defaults.max_context,
        help="context views per scene drawn from 1..K (K at most T - 1)",
    )
    p.add_argument("--impl", choices=CHOICES["impl"], default=defaults.impl, help="model implementation")
    p.add_argument(
        "--precision",
        choices=CHOICES["precision"],
        default=defaults.precision,
        help="bf16: autocast the convolutions (on a GPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=defaults.out, help="run folder: checkpoints, metrics, pictures")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with the run's settings for every "
        "option not given here (one given that changes the result and differs from the run's is "
        "refused unless --allow-change; --steps and the like are free)",
    )
    p.add_argument(
        "--allow-change",
        default=defaults.allow_change,
        metavar="SETTINGS",
        help=f"with --resume: settings allowed to differ from the run's, comma-separated, "
        f"of {', '.join(RESULT_SETTINGS)}",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seeds the weights, the batches and the latents")
    p.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="data loader workers gathering batches ahead (0: in the training loop); threads for a converted "
        "folder, processes decoding JPEGs for a download (default: on a GPU, for a download one per core but one, "
        "at most 8, for a folder 2; on the CPU, 1 for a download, 0 for a folder)",
    )
    p.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between metrics.jsonl records")
    p.add_argument("--image-every", type=int, default=defaults.image_every, help="steps between progress pictures")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=defaults.keep, help="checkpoints kept")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU if there is one)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=defaults.max_minutes,
        help="stop at the first step boundary after this many minutes of training, with a "
        "checkpoint and a picture (a time-limited machine); --resume continues",
    )
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="run each step eagerly on a GPU (by default one CUDA device replays it from CUDA graphs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="CPU threads for torch (default: one per core, the fastest on an idle machine; "
        "on a machine other jobs share, 1: two threads spin against the other job)",
    )
    p.set_defaults(run="gqn_fast.train:run_command")


def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="a checkpoint as a published model (.safetensors): parameters, config, "
        "step and dataset, no optimizer state and no pickled code",
    )
    p.add_argument("checkpoint")
    p.add_argument("out", help="a .safetensors file to write, or a model folder (then OUT/model.safetensors)")
    p.add_argument("--half", action="store_true", help="store the parameters in fp16 (they load into fp32 models)")
    p.add_argument(
        "--keep-data-path",
        action="store_true",
        help="keep the training data's local path instead of naming a built-in set by its generator",
    )
    p.set_defaults(run="gqn_fast.evaluate:run_export")

    p = subparsers.add_parser(
        "eval", help="test-set ELBO terms and prediction error against the number of context views"
    )
    add_common_arguments(
        p, "folder for metrics.json and context_curve.png (default: a new folder <run>/eval/step-N[-i])"
    )
    p.add_argument("--scenes", type=int, default=1000, help="test scenes to use at most")
    p.add_argument("--max-context", type=int, help="K: the curve covers 1..K views (default: T - 1)")
    p.add_argument("--samples", type=int, default=4, help="k: prior samples per query for the prediction error")
    p.add_argument("--batch", type=int, default=32, help="scenes per forward pass")
    p.set_defaults(run="gqn_fast.evaluate:run_eval")

    p = subparsers.add_parser("sample", help="pictures of held-out scenes and fly-around GIFs")
    add_common_arguments(p, "folder for the pictures (default: a new folder <run>/samples/step-N[-i])")
    p.add_argument("--scenes", type=int, default=4, help="test scenes to draw")
    p.add_argument("--samples", type=int, default=4, help="prior samples per scene")
    p.add_argument("--context", type=int, default=5, help="context views per scene")
    p.add_argument("--frames", type=int, default=36, help="frames of the fly-around")
    p.set_defaults(run="gqn_fast.evaluate:run_sample")


def register_analyze(subparsers) -> None:
    analyze = subparsers.add_parser(
        "analyze", help="what the scene representation r holds: t-SNE, scene algebra, composition"
    )
    commands = analyze.add_subparsers(dest="analysis", required=True)

    p = commands.add_parser(
        "tsne", help="t-SNE of r over scenes and view subsets; nearest-neighbour scene accuracy of r vs pixels"
    )
    add_common_arguments(p, "folder for tsne.json and tsne.png (default: a new folder <run>/analyze-tsne/step-N[-i])")
    p.add_argument("--scenes", type=int, default=50, help="test scenes")
    p.add_argument("--subsets", type=int, default=5, help="random subsets of views per scene")
    p.add_argument("--views", type=int, default=2, help="views in each subset")
    p.set_defaults(run="gqn_fast.analyze:run_tsne")

    p = commands.add_parser("algebra", help="r(A) - r(B) + r(C) on built-in rooms that differ in one property")
    add_common_arguments(
        p, "folder for algebra.json and algebra.png (default: a new folder <run>/analyze-algebra/step-N[-i])"
    )
    p.add_argument("--properties", nargs="+", choices=ALGEBRA_PROPERTIES, help="properties to change (default: all)")
    p.add_argument("--triples", type=int, default=4, help="scene triples per property")
    p.add_argument("--context", type=int, default=5, help="context views of A, B and C")
    p.add_argument("--queries", type=int, default=3, help="query views of D compared per triple")
    p.add_argument("--samples", type=int, default=4, help="prior samples averaged per prediction")
    p.set_defaults(run="gqn_fast.analyze:run_algebra")

    p = commands.add_parser(
        "composition", help="prediction error on test scenes with the combination the training split held out"
    )
    add_common_arguments(
        p,
        "folder for composition.json and composition.png (default: a new folder <run>/analyze-composition/step-N[-i])",
    )
    p.add_argument("--scenes", type=int, default=500, help="test scenes to use at most")
    p.add_argument("--context", type=int, default=5, help="context views per scene")
    p.add_argument("--samples", type=int, default=4, help="prior samples per query (MSE of their mean)")
    p.add_argument("--show", type=int, default=3, help="scenes per group in the picture")
    p.set_defaults(run="gqn_fast.analyze:run_composition")


REGISTER = (register_data, register_train, register_evaluate, register_analyze)
