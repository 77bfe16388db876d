"""`gqn-fast data make | convert-deepmind | show`: what the data commands run (their arguments:
gqn_fast/arguments.py)."""

from __future__ import annotations

from gqn_fast.errors import UsageError, check_count

# What goes wrong for a user (a UserError, an OSError) reaches gqn_fast.cli, which says it in one line.
# Each command imports what it runs: convert-deepmind loads no torch.


def _make(args) -> int:
    from gqn_fast.data.builtin import dataset_summary, make_dataset
    from gqn_fast.devices import device_of

    family = args.family
    if args.parts is not None:
        if family != "shepard_metzler":
            raise UsageError("--parts applies to shepard_metzler only")
        family = "shepard_metzler" if args.parts == 5 else "shepard_metzler_7"
    if args.device is not None:
        device_of(args.device)  # a device torch cannot use is named here, not in a worker's traceback
    out = make_dataset(
        args.out,
        family,
        args.scenes,
        args.seed,
        args.test_fraction,
        workers=args.workers,
        device=args.device,
        progress=not args.quiet,
        overwrite=args.overwrite,
        holdout=args.holdout,
    )
    print(f"wrote {out}\n{dataset_summary(out)}")
    return 0


def _convert(args) -> int:
    from gqn_fast.data.deepmind import convert_deepmind

    if args.workers is not None:
        check_count("--workers", args.workers)
    report = convert_deepmind(
        args.src,
        args.out,
        args.dataset,
        splits=args.splits,
        workers=args.workers,
        skip_corrupt=args.skip_corrupt,
        progress=not args.quiet,
    )
    for split, r in report.items():
        note = "" if r["files"] == r["expected_files"] else f" (the full release has {r['expected_files']})"
        print(f"{split}: {r['scenes']} scenes from {r['files']} files{note}")
        for file, index, problem in r["skipped"]:
            print(f"  skipped {file} record {index}: {problem}")
    return 0


def _show(args) -> int:
    from gqn_fast.data.show import save_grid

    if args.views is not None:
        check_count("--views", args.views)
    out = save_grid(
        args.dir,
        args.out,
        split=args.split,
        scenes=args.scenes,
        views=args.views,
        first=args.first,
        dataset_name=args.dataset,
    )
    print(f"wrote {out}")
    return 0
