"""Writing bench results: JSON rows, a markdown table, and the plots drawn from them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REFERENCE = {"model": "reference-eager", "kernel": "eager", "representation": "eager"}


def add_speedups(rows: list[dict]) -> None:
    """speedup = baseline time / this time, against the reference in eager mode (models) or the
    eager PyTorch math (kernels), at the same workload, size, mode and precision."""

    def key(r):
        return (r["workload"], r.get("preset"), r.get("batch"), r.get("precision"), r.get("mode"))

    baselines = {}
    for r in rows:
        if r.get("provider") in REFERENCE.values() and "median_ms" in r:
            baselines.setdefault(key(r), r["median_ms"])
    for r in rows:
        base = baselines.get(key(r))
        if base and "median_ms" in r:
            r["speedup"] = base / r["median_ms"]
    # Peak memory against the eager reference's at the same workload and size.
    peaks = {key(r): r["peak_bytes"] for r in rows if r.get("provider") == REFERENCE["model"] and r.get("peak_bytes")}
    for r in rows:
        if r.get("peak_bytes") and key(r) in peaks:
            r["peak_vs_reference"] = r["peak_bytes"] / peaks[key(r)]
    # The fused cell's goal is set against cuDNN's conv followed by the gate kernel.
    unfused = {key(r): r["median_ms"] for r in rows if r.get("provider") == "cudnn+gate-kernel" and "median_ms" in r}
    for r in rows:
        if key(r) in unfused and "median_ms" in r:
            r["vs_unfused"] = unfused[key(r)] / r["median_ms"]


def _fmt(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


COLUMNS = [
    ("workload", "workload"),
    ("preset", "preset"),
    ("batch", "B"),
    ("precision", "precision"),
    ("mode", "mode"),
    ("provider", "provider"),
    ("median_ms", "median ms"),
    ("p20_ms", "p20"),
    ("p80_ms", "p80"),
    ("speedup", "speedup"),
    ("vs_unfused", "vs unfused"),
    ("TFLOPs", "TFLOP/s"),
    ("GBps", "GB/s"),
    ("share_of_copy_bw", "of copy BW"),
    ("share_of_matmul", "of matmul"),
    ("share_of_peak", "of peak"),
    ("images_per_s", "images/s"),
    ("batches_per_s", "batches/s"),
    ("peak_bytes", "peak MiB"),
    ("peak_vs_reference", "peak vs ref"),
    ("saved_bytes", "saved MiB"),
    ("compile_s", "compile s"),
    ("ops_per_step", "ops/step"),
    ("views_per_step", "views/step"),
    ("autograd_nodes", "autograd nodes"),
    ("error", "error"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for k, _ in COLUMNS:
            v = r.get(k)
            if k in ("peak_bytes", "saved_bytes") and v is not None:
                v = v / 2**20
            cells.append(_fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_speedups(rows: list[dict], path: Path) -> None:
    """Training-step speedup over the eager reference, per provider and batch size."""
    steps = [r for r in rows if r["workload"] == "train_step" and "speedup" in r]
    fig, axes = plt.subplots(
        1,
        max(1, len({(r["preset"], r["precision"]) for r in steps})),
        figsize=(6 * max(1, len({(r["preset"], r["precision"]) for r in steps})), 4),
        squeeze=False,
    )
    for ax, (preset, precision) in zip(axes[0], sorted({(r["preset"], r["precision"]) for r in steps})):
        subset = [r for r in steps if r["preset"] == preset and r["precision"] == precision]
        batches = sorted({r["batch"] for r in subset})
        providers = sorted({r["provider"] for r in subset})
        width = 0.8 / max(1, len(providers))
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, b in enumerate(batches):
                match = [r["speedup"] for r in subset if r["provider"] == provider and r["batch"] == b]
                if match:
                    xs.append(j + i * width)
                    ys.append(match[0])
            ax.bar(xs, ys, width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        ax.set_ylabel("speedup over reference (eager)")
        ax.set_title(f"training step, {preset} preset, {precision}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(rows: list[dict], limits: dict, path: Path) -> None:
    """Measured time against the floor set by the device: bytes / copy bandwidth for kernels,
    FLOPs / matrix-product rate for models. Points on the diagonal run at the limit."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for r in rows:
        if "median_ms" not in r:
            continue
        if "bytes" in r:
            floor = r["bytes"] / limits["copy_GBps"] / 1e6
        elif "flops" in r:
            rate = limits["matmul_bfloat16_TFLOPs" if r["precision"] == "bf16" else "matmul_float32_TFLOPs"]
            floor = r["flops"] / rate / 1e9
        else:
            continue
        marker = "o" if r["provider"].startswith("gqn_fast") else "x"
        ax.scatter(floor, r["median_ms"], marker=marker, s=14, label=r["provider"])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("floor: work / measured device limit (ms)")
    ax.set_ylabel("measured median (ms)")
    ax.set_title("time against the roofline floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, environment: dict, limits: dict, rows: list[dict], plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "md": out / "results.md"}
    if plots:
        files.update(speedup=out / "speedup.png", roofline=out / "roofline.png")
    rows = [dict(r, **{k: environment[k] for k in ("device", "commit", "date") if k not in r}) for r in rows]
    files["json"].write_text(json.dumps({"environment": environment, "limits": limits, "rows": rows}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in {**environment, **limits}.items())
    files["md"].write_text(f"# gqn-fast benchmark\n\n{header}\n\n{markdown_table(rows)}")
    if plots:
        plot_speedups(rows, files["speedup"])
        plot_roofline(rows, limits, files["roofline"])
    return list(files.values())


def merge(out: Path, runs: list[Path]) -> list[Path]:
    """One results folder from several runs on the same device (e.g. one preset per run, so that a
    long run lost loses one preset). Each row keeps its own commit and date; the header lists
    every run's, and its command; the limits are the first run's."""
    loaded = [json.loads((run / "results.json").read_text()) for run in runs]
    devices = {d["environment"]["device"] for d in loaded}
    if len(devices) != 1:
        raise SystemExit(f"runs: expected one device, got {sorted(devices)}")
    environment = dict(loaded[0]["environment"])
    for key in ("commit", "date", "command"):
        environment[key] = "; ".join(str(d["environment"].get(key)) for d in loaded)
    rows = [row for d in loaded for row in d["rows"]]
    add_speedups(rows)
    return write(out, environment, loaded[0]["limits"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Merge bench/run.py result folders into one.")
    parser.add_argument("--out", type=Path, required=True, help="the merged results folder")
    parser.add_argument("runs", type=Path, nargs="+", help="result folders of bench/run.py --out")
    args = parser.parse_args()
    print("wrote " + ", ".join(str(f) for f in merge(args.out, args.runs)))
    sys.exit(0)
