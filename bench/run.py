"""gqn-fast's speed and memory evidence: `python bench/run.py [--quick | --smoke] [--only NAME]`.

Every provider side by side in one run (--only conv_cell: one ConvLSTM cell, its 5x5 conv
fused with the gates against cuDNN's conv plus the gate kernel, at B = 8 and 36): the reference in eager PyTorch and under torch.compile
(default and max-autotune), gqn_fast eager, compiled, and with the training step captured in a
CUDA graph; fp32 (TF32 settings pinned and printed) and bf16 autocast. Results go to
bench/results/<device>/: results.json (one row per measurement, with the environment),
results.md (the table), speedup.png and roofline.png; a --smoke run to bench/results/smoke/<device>/
(ignored by git), never among the committed results.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data_bench  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from measure import measured_limits, nominal_peaks  # noqa: E402

from gqn_fast import GQNConfig  # noqa: E402

GROUPS = ["kernels", "conv_cell", "train_step", "representation", "data", "convlstm"]
ROOT = Path(__file__).resolve().parents[1]


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += "+uncommitted changes" if changed else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["driver"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return env


# What users run: the paper preset with each representation and with shared cores, and the
# small presets of GQN and its family (label -> config).
SMALL_PRESETS = ("small", "jump-small", "attention-small")  # at B = 8 on a CPU, 36 on a GPU
MODEL_PRESETS = {
    "small": GQNConfig.preset("small"),
    "jump-small": GQNConfig.preset("jump-small"),
    "paper-tower": GQNConfig.preset("paper"),
    "paper-pool": GQNConfig.preset("paper", representation="pool"),
    "paper-pyramid": GQNConfig.preset("paper", representation="pyramid"),
    "paper-shared": GQNConfig.preset("paper", share_cores=True),
    "attention-small": GQNConfig.preset("attention-small"),
}


def model_cases(device: torch.device, full: bool, presets=None, batches=None) -> list:
    """(label, config, batch) of the whole-model comparisons. The paper preset at B = 4 and 36;
    on a CPU B = 36 only with --full (a step takes minutes there). presets, batches: the ones to
    keep (None: all), in the order of presets where given (what matters most first)."""
    paper_batches = [4, 36] if device.type == "cuda" or full else [4]
    small_batch = 36 if device.type == "cuda" else 8
    cases = [(label, MODEL_PRESETS[label], small_batch) for label in SMALL_PRESETS]
    cases += [
        (label, config, b)
        for label, config in MODEL_PRESETS.items()
        if label not in SMALL_PRESETS
        for b in paper_batches
    ]
    cases = [case for case in cases if batches is None or case[2] in batches]
    if presets is None:
        return cases
    return sorted((case for case in cases if case[0] in presets), key=lambda case: list(presets).index(case[0]))


def plan(device: torch.device, smoke: bool, quick: bool, full: bool = False, presets=None, batches=None) -> dict:
    """Which sizes each group runs at."""
    tiny = GQNConfig(representation="tower", L=2, z_dim=2, hidden=8, canvas=8, r_dim=16)
    if smoke:
        return dict(
            cases=[("tiny", tiny, 2)],
            precisions=["fp32"],
            kernel_sizes=[2],
            kernel_dtypes=[torch.float32],
            repeats=2,
            representation=(tiny, 2),
            cell_batches=[2],
        )
    if device.type != "cuda":
        # A CPU runs the model comparisons only: the kernels are written for GPUs. A paper
        # step takes seconds here: few repeats, each provider's turns interleaved.
        return dict(
            cases=model_cases(device, full, presets, batches),
            precisions=["fp32"],
            kernel_sizes=[],
            kernel_dtypes=[],
            repeats=3 if quick else 5,
            representation=(GQNConfig.preset("small"), 8),
            cell_batches=[],
        )
    paper = GQNConfig.preset("paper")
    return dict(
        cases=model_cases(device, full, presets, batches),
        precisions=["fp32", "bf16"],
        kernel_sizes=[36, 1024] if quick else [8, 36, 128, 512, 2048],
        kernel_dtypes=[torch.float32, torch.bfloat16],
        repeats=10 if quick else 30,
        representation=(paper, 36),
        cell_batches=[8, 36],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only this group (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, in seconds (CI)")
    parser.add_argument("--full", action="store_true", help="on a CPU, the paper preset at B = 36 too")
    parser.add_argument(
        "--preset",
        choices=list(MODEL_PRESETS),
        action="append",
        help="whole-model comparisons of this preset only (repeatable)",
    )
    parser.add_argument(
        "--batch", type=int, action="append", help="whole-model comparisons at this batch size only (repeatable)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: its own choice); 1 measures a shared, oversubscribed "
        "machine fairly, where spinning thread pools slow each other down",
    )
    parser.add_argument(
        "--provider",
        action="append",
        help="whole-model comparisons with this provider only, e.g. gqn_fast-eager (repeatable)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed calls per provider and size (default: 5 on a CPU, 3 with --quick; 30 on a GPU, 10 with --quick)",
    )
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<device>)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    # Pinned, and printed with the results: fp32 convs and matmuls may use TF32 tensor cores.
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    groups = args.only or GROUPS
    sizes = plan(device, args.smoke, args.quick, args.full, args.preset, args.batch)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats: expected a positive number, got {args.repeats}")
        sizes["repeats"] = args.repeats
    log = lambda line: print(line, flush=True)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    limits = measured_limits(device, quick=args.quick or args.smoke)
    limits.update(nominal_peaks(env["device"]))
    log("measured limits: " + ", ".join(f"{k}={v:.1f}" for k, v in limits.items()))

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", env["device"]).strip("-")
    results = ROOT / "bench" / "results"
    # A smoke run's tiny sizes never land where the committed results are (git ignores smoke/).
    out = args.out or (results / "smoke" / name if args.smoke else results / name)
    if (
        args.smoke
        and out.resolve().is_relative_to(results.resolve())
        and not out.resolve().is_relative_to((results / "smoke").resolve())
    ):
        parser.error(
            f"--smoke: --out {args.out} is among the committed results in {results}; "
            f"write a smoke run elsewhere (default {results / 'smoke' / name})"
        )

    def save(rows: list[dict], final: bool) -> list:
        """Rates and speedups filled in, then results.json and results.md written (the plots too
        when final)."""
        for r in rows:
            if "TFLOPs" in r:
                rate = limits["matmul_bfloat16_TFLOPs" if r["precision"] == "bf16" else "matmul_float32_TFLOPs"]
                r["share_of_matmul"] = r["TFLOPs"] / rate
        report.add_speedups(rows)
        return report.write(out, env, limits, rows, plots=final)

    rows = []
    if "kernels" in groups:
        if sizes["kernel_sizes"]:
            log("kernels:")
            rows += workloads.kernel_rows(
                device,
                sizes["kernel_dtypes"],
                sizes["kernel_sizes"],
                args.smoke,
                sizes["repeats"],
                limits["copy_GBps"],
                log,
            )
            save(rows, final=False)
        else:
            log("kernels: skipped, the kernel microbenchmarks need a CUDA GPU (use --smoke to check the plumbing)")
    if "conv_cell" in groups:
        if sizes["cell_batches"]:
            log("one ConvLSTM cell (5x5 conv + gates), fused and unfused:")
            rows += workloads.conv_cell_rows(
                device, sizes["kernel_dtypes"], sizes["cell_batches"], args.smoke, sizes["repeats"], limits, log
            )
            save(rows, final=False)
        else:
            log("conv_cell: skipped, the fused cell is a GPU kernel (use --smoke to check the plumbing)")
    if "train_step" in groups:
        log("training step and generation:")
        for case in sizes["cases"]:  # results written after each: a run killed at its time limit keeps them
            rows += workloads.model_rows(
                [case], sizes["precisions"], device, args.smoke, args.quick, sizes["repeats"], log, args.provider
            )
            save(rows, final=False)
    if "representation" in groups:
        log("representation net:")
        config, batch = sizes["representation"]
        rows += workloads.representation_rows(
            config, batch, sizes["precisions"], device, args.smoke, sizes["repeats"], log
        )
        save(rows, final=False)
    if "convlstm" in groups:
        log("gqn_fast.nn.ConvLSTM against the plain ConvLSTM it replaces (CPU: scaled-down sizes):")
        rows += workloads.convlstm_rows(device, args.smoke, sizes["repeats"], log)
        save(rows, final=False)
    if "data" in groups:
        log("data:")
        rows += data_bench.data_rows(smoke=args.smoke, log=log)
        save(rows, final=False)

    files = save(rows, final=True)
    print(report.markdown_table(rows))
    log("wrote " + ", ".join(str(f) for f in files))
    failures = [r for r in rows if "error" in r]
    if failures:
        log(f"{len(failures)} measurements failed; see the error column")
    return 1 if failures and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
