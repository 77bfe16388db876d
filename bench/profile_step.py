"""Where one eager training step's time goes: `python bench/profile_step.py --preset small --batch 36`.

Writes to --out (default bench/results/profile/<preset>-B<batch>-<precision>-<model>/):
  summary.json  the step's wall time and issue time (how long the Python call takes to return,
                the GPU not waited on: when it is close to the wall time the GPU waits on the
                host), the device's busy time, kernels per step, and what bench/op_count.py
                counts for the model
  profile.txt   torch.profiler's top ops by device time and by host time
The step is bench's: forward, backward and fused Adam, inside values_trusted() as `gqn-fast
train` runs it. On a CPU the device is the CPU (issue time = wall time). --smoke: a tiny model
in seconds, for CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import synchronize  # noqa: E402
from op_count import count_training_step, on_gpu_branches  # noqa: E402
from run import MODEL_PRESETS  # noqa: E402
from workloads import IMPLEMENTATIONS, make_optimizer, make_train_step, model_class_of, scene_batches  # noqa: E402

from gqn_fast import GQNConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = GQNConfig(representation="tower", L=2, z_dim=2, hidden=8, canvas=8, r_dim=16)


def _device_time_us(event) -> float:
    # torch renamed self_cuda_time_total to self_device_time_total (2.4); read either.
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def step_times(step, device: torch.device, repeats: int) -> dict:
    """Median wall and issue times of `step` (ms), the device idle before each call."""
    wall, issue = [], []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        issue.append((issued - start) * 1e3)
        wall.append((done - start) * 1e3)
    return {"wall_ms": statistics.median(wall), "issue_ms": statistics.median(issue)}


def profile_step(step, device: torch.device, steps: int) -> tuple[dict, str]:
    """torch.profiler over `steps` calls: (per-step device figures, the two top-op tables)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    averages = prof.key_averages()
    figures = {}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        figures["kernels_per_step"] = len(kernels) / steps
        figures["device_busy_ms"] = sum(_device_time_us(e) for e in averages) / 1e3 / steps
        by_device = averages.table(sort_by="self_device_time_total", row_limit=25)
    else:
        by_device = "(no GPU: the device is the CPU, see the host table)"
    by_host = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    text = f"top ops by device time ({steps} steps)\n{by_device}\n\ntop ops by host time ({steps} steps)\n{by_host}\n"
    return figures, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(MODEL_PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=36)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--model", choices=list(IMPLEMENTATIONS), default="gqn_fast")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, in seconds")
    parser.add_argument("--out", type=Path, help="folder for summary.json and profile.txt")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error(f"--batch and --repeats: expected positive numbers, got {args.batch} and {args.repeats}")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    config = TINY if args.smoke else MODEL_PRESETS[args.preset]
    batch = 2 if args.smoke else args.batch
    name = f"{'smoke' if args.smoke else args.preset}-B{batch}-{args.precision}-{args.model}"
    out = args.out or ROOT / "bench" / "results" / "profile" / name
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = model_class_of(args.model, config)(config).to(device)
    step = make_train_step(
        model, make_optimizer(model, device), scene_batches(batch, device), args.precision, device, None, False, False
    )
    for _ in range(3):  # warm: autotuning, caches, the optimizer's state
        step()
    times = step_times(step, device, args.repeats)
    try:  # the timings above are kept whatever the profiler does (its CUDA side is new here)
        figures, tables = profile_step(step, device, steps=3)
    except Exception as error:
        figures, tables = {"profile_error": f"{type(error).__name__}: {error}"}, f"profiler failed: {error!r}\n"
    counts = count_training_step(on_gpu_branches(model_class_of(args.model, config), config), batch)
    summary = {
        "preset": name.split("-B")[0],
        "batch": batch,
        "precision": args.precision,
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **times,
        **figures,
        "op_count": counts,
    }
    if "device_busy_ms" in summary:
        # Above 1: the device waits on the host; a CUDA graph (bench's gqn_fast-cudagraph) removes it.
        summary["host_bound_ratio"] = summary["issue_ms"] / summary["device_busy_ms"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "profile.txt").write_text(tables)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} and {out / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
