"""`gqn-fast data make | convert-deepmind | show`: the data commands of the CLI."""

from __future__ import annotations

import sys

from gqn_fast.data.builtin import DEFAULT_SCENES, DEFAULT_SEED, TEST_FRACTION, dataset_summary, make_dataset
from gqn_fast.data.deepmind import DEEPMIND_DATASETS, convert_deepmind
from gqn_fast.data.format import DatasetFormatError
from gqn_fast.data.scenes import HOLDOUTS
from gqn_fast.data.show import save_grid
from gqn_fast.data.tfrecord import CorruptRecordError

# Errors a user can cause and fix: reported in one line, exit code 1, no traceback.
USER_ERRORS = (DatasetFormatError, CorruptRecordError, FileExistsError, FileNotFoundError, ValueError)


def _fail(command: str, error: Exception) -> int:
    print(f"gqn-fast data {command}: error: {error}", file=sys.stderr)
    return 1


def _make(args) -> int:
    family = args.family
    if args.parts is not None:
        if family != "shepard_metzler":
            return _fail("make", ValueError("--parts applies to shepard_metzler only"))
        family = "shepard_metzler" if args.parts == 5 else "shepard_metzler_7"
    try:
        out = make_dataset(args.out, family, args.scenes, args.seed, args.test_fraction, workers=args.workers,
                           device=args.device, progress=not args.quiet, overwrite=args.overwrite,
                           holdout=args.holdout)
    except USER_ERRORS as error:
        return _fail("make", error)
    print(f"wrote {out}\n{dataset_summary(out)}")
    return 0


def _convert(args) -> int:
    try:
        report = convert_deepmind(args.src, args.out, args.dataset, splits=args.splits, workers=args.workers,
                                  skip_corrupt=args.skip_corrupt, progress=not args.quiet)
    except USER_ERRORS as error:
        return _fail("convert-deepmind", error)
    for split, r in report.items():
        note = "" if r["files"] == r["expected_files"] else f" (the full release has {r['expected_files']})"
        print(f"{split}: {r['scenes']} scenes from {r['files']} files{note}")
        for file, index, problem in r["skipped"]:
            print(f"  skipped {file} record {index}: {problem}")
    return 0


def _show(args) -> int:
    try:
        out = save_grid(args.dir, args.out, split=args.split, scenes=args.scenes, views=args.views, first=args.first)
    except USER_ERRORS as error:
        return _fail("show", error)
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
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
    make.add_argument("--holdout", choices=sorted(HOLDOUTS),
                      help="a combination the train split never shows (rooms only), for compositionality tests")
    make.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(func=_make)

    convert = commands.add_parser("convert-deepmind", help="convert DeepMind's gqn-datasets TFRecords")
    convert.add_argument("src", help="folder holding <dataset>/train and <dataset>/test (or train/ and test/)")
    convert.add_argument("out", help="dataset folder to write (a stopped conversion resumes)")
    convert.add_argument("--dataset", required=True, choices=sorted(DEEPMIND_DATASETS))
    convert.add_argument("--splits", nargs="+", choices=["train", "test"], default=["train", "test"])
    convert.add_argument("--workers", type=int, help="files converted in parallel (default: one per core)")
    convert.add_argument("--skip-corrupt", action="store_true", help="skip and report damaged records")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_convert)

    show = commands.add_parser("show", help="write a PNG grid of scenes and their views")
    show.add_argument("dir", help="dataset folder")
    show.add_argument("--out", help="PNG to write (default: DIR/preview-<split>.png)")
    show.add_argument("--split", choices=["train", "test"], default="train")
    show.add_argument("--scenes", type=int, default=8)
    show.add_argument("--views", type=int, help="views per scene (default: all, at most 16)")
    show.add_argument("--first", type=int, default=0, help="index of the first scene")
    show.set_defaults(func=_show)
