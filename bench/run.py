"""gqn-fast's speed and memory evidence: `python bench/run.py [--quick | --smoke] [--only NAME]`.

Every provider side by side in one run (--only conv_cell: one ConvLSTM cell, its 5x5 conv
fused with the gates against cuDNN's conv plus the gate kernel, at B = 8 and 36): the reference in eager PyTorch and under torch.compile
(default and max-autotune), gqn_fast eager, compiled, and with the training step captured in a
CUDA graph; fp32 (TF32 settings pinned and printed) and bf16 autocast. Results go to
bench/results/<device>/: results.json (one row per measurement, with the environment),
results.md (the table), speedup.png and roofline.png.
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

from measure import measured_limits, nominal_peaks  # noqa: E402

import data_bench  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402
from gqn_fast import GQNConfig  # noqa: E402

GROUPS = ["kernels", "conv_cell", "train_step", "representation", "data"]
ROOT = Path(__file__).resolve().parents[1]


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return env


def plan(device: torch.device, smoke: bool, quick: bool) -> dict:
    """Which sizes each group runs at."""
    tiny = GQNConfig(representation="tower", L=2, z_dim=2, hidden=8, canvas=8, r_dim=16)
    if smoke:
        return dict(presets={"tiny": tiny}, batches={"tiny": [2]}, precisions=["fp32"],
                    kernel_sizes=[2], kernel_dtypes=[torch.float32], repeats=2,
                    representation=(tiny, 2), cell_batches=[2])
    if device.type != "cuda":
        # A CPU runs the model comparisons only: the kernels are written for GPUs.
        return dict(presets={"small": GQNConfig.preset("small")}, batches={"small": [8]},
                    precisions=["fp32"], kernel_sizes=[], kernel_dtypes=[], repeats=5,
                    representation=(GQNConfig.preset("small"), 8), cell_batches=[])
    paper = GQNConfig.preset("paper")
    return dict(
        presets={"paper": paper, "small": GQNConfig.preset("small")},
        batches={"paper": [8, 36] if quick else [1, 8, 36, 128], "small": [36]},
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
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<device>)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    # Pinned, and printed with the results: fp32 convs and matmuls may use TF32 tensor cores.
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device)
    groups = args.only or GROUPS
    sizes = plan(device, args.smoke, args.quick)
    log = lambda line: print(line, flush=True)
    log("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    limits = measured_limits(device, quick=args.quick or args.smoke)
    limits.update(nominal_peaks(env["device"]))
    log("measured limits: " + ", ".join(f"{k}={v:.1f}" for k, v in limits.items()))

    rows = []
    if "kernels" in groups:
        if sizes["kernel_sizes"]:
            log("kernels:")
            rows += workloads.kernel_rows(device, sizes["kernel_dtypes"], sizes["kernel_sizes"],
                                          args.smoke, sizes["repeats"], limits["copy_GBps"], log)
        else:
            log("kernels: skipped, the kernel microbenchmarks need a CUDA GPU (use --smoke to check the plumbing)")
    if "conv_cell" in groups:
        if sizes["cell_batches"]:
            log("one ConvLSTM cell (5x5 conv + gates), fused and unfused:")
            rows += workloads.conv_cell_rows(device, sizes["kernel_dtypes"], sizes["cell_batches"], args.smoke,
                                             sizes["repeats"], limits, log)
        else:
            log("conv_cell: skipped, the fused cell is a GPU kernel (use --smoke to check the plumbing)")
    if "train_step" in groups:
        log("training step and generation:")
        rows += workloads.model_rows(sizes["presets"], sizes["batches"], sizes["precisions"], device,
                                     args.smoke, args.quick, sizes["repeats"], log)
    if "representation" in groups:
        log("representation net:")
        config, batch = sizes["representation"]
        rows += workloads.representation_rows(config, batch, sizes["precisions"], device,
                                              args.smoke, sizes["repeats"], log)
    if "data" in groups:
        log("data:")
        rows += data_bench.data_rows(smoke=args.smoke, log=log)

    for r in rows:
        if "TFLOPs" in r:
            rate = limits["matmul_bfloat16_TFLOPs" if r["precision"] == "bf16" else "matmul_float32_TFLOPs"]
            r["share_of_matmul"] = r["TFLOPs"] / rate
    report.add_speedups(rows)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", env["device"]).strip("-")
    out = args.out or ROOT / "bench" / "results" / name
    files = report.write(out, env, limits, rows)
    print(report.markdown_table(rows))
    log("wrote " + ", ".join(str(f) for f in files))
    failures = [r for r in rows if "error" in r]
    if failures:
        log(f"{len(failures)} measurements failed; see the error column")
    return 1 if failures and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
