"""Data pipeline throughput: `python bench/data_bench.py [--scenes N] [--smoke] [--device cuda]`.

- render: the built-in renderer alone, one process on one CPU thread (images/s), and on the
  GPU when there is one.
- make: `gqn-fast data make rooms` end to end (render in one process per core, write to disk),
  images/s. The issue's bar: 500 images/s on 2 cores (20,000 scenes in under 7 minutes).
- loader: make_loader batches/s for the paper's batch (B = 36, M up to K = 9) with 0, 1 and 2
  worker threads, and with to_model_inputs on the device. The bar: 200 batches/s on 2 cores.

`data_rows(smoke, log)` returns one dict per measurement, for bench/run.py's results.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gqn_fast.data.builtin import _worker_init, default_workers, make_dataset
from gqn_fast.data.loader import make_loader, to_model_inputs
from gqn_fast.data.render import render
from gqn_fast.data.scenes import get_family, sample_scenes


def _timed(fn, repeats: int, device=None) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _row(workload, provider, seconds: list[float], items: int, unit: str, **extra) -> dict:
    q = statistics.quantiles(seconds, n=5) if len(seconds) > 1 else [seconds[0]] * 4
    median = statistics.median(seconds)
    return dict(workload=workload, provider=provider, precision="uint8", median_ms=median * 1e3,
                p20_ms=q[0] * 1e3, p80_ms=q[3] * 1e3, **{f"{unit}_per_s": items / median}, **extra)


def _render_seconds(family: str, scenes: int, repeats: int, device) -> list[float]:
    device = torch.device(device)
    scene_list, cameras = sample_scenes(family, 0, "train", 0, scenes)
    cameras = torch.from_numpy(cameras).to(device)
    return _timed(lambda: render(scene_list, cameras, device=device), repeats, device)


def bench_render(family: str = "rooms", scenes: int = 64, repeats: int = 5, device="cpu") -> dict:
    """The renderer alone on `scenes` scenes: images/s (one CPU thread, or the GPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        # In a worker process on one thread, as `data make` renders (see gqn_fast/data/render.py).
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(1, initializer=_worker_init) as pool:
            seconds = pool.apply(_render_seconds, (family, scenes, repeats, "cpu"))
    else:
        seconds = _render_seconds(family, scenes, repeats, device)
    images = scenes * get_family(family).num_views
    return _row("render", f"{family}-{device.type}", seconds, images, "images", batch=scenes)


def bench_make(out: Path, family: str = "rooms", scenes: int = 2000, workers: int | None = None) -> dict:
    """`data make` end to end (render + write to disk): images/s."""
    workers = workers or default_workers()
    start = time.perf_counter()
    make_dataset(out, family, scenes, seed=0, workers=workers, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    images = scenes * get_family(family).num_views
    return _row("make", f"{family}-{workers}proc", [seconds], images, "images", batch=scenes, workers=workers)


def bench_loader(root, workers: int, batch_size: int = 36, max_context: int = 9, batches: int = 300,
                 device=None) -> dict:
    """make_loader batches/s (B = batch_size, M uniform in 1..max_context) after a warm-up
    epoch; with `device`, each batch also goes through to_model_inputs there."""
    loader = make_loader(root, "train", batch_size, max_context, seed=0, num_workers=workers,
                         pin_memory=device is not None and torch.device(device).type == "cuda")
    # Warm-up: one pass maps the files' pages into this process, once per run of a training job.
    for batch in loader:
        if device is not None:
            to_model_inputs(batch, device)
    done, epoch = 0, 1
    start = time.perf_counter()
    while done < batches:
        loader.set_epoch(epoch)
        for batch in loader:
            if device is not None:
                to_model_inputs(batch, device)
            done += 1
            if done == batches:
                break
        epoch += 1
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    where = "host" if device is None else torch.device(device).type
    return _row("loader", f"{workers}workers-{where}", [seconds / batches], 1, "batches",
                batch=batch_size, max_context=max_context, measured_batches=batches)


def data_rows(smoke: bool = False, log=print, scenes: int | None = None) -> list[dict]:
    rows = []
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    for family in ("rooms", "shepard_metzler"):
        rows.append(bench_render(family, scenes=16 if smoke else 64, repeats=2 if smoke else 5))
        log(f"  render {family}, 1 CPU thread: {rows[-1]['images_per_s']:.0f} images/s")
        if gpu is not None:
            rows.append(bench_render(family, scenes=64 if smoke else 2048, repeats=2 if smoke else 5, device=gpu))
            log(f"  render {family}, {torch.cuda.get_device_name(gpu)}: {rows[-1]['images_per_s']:.0f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rooms"
        n = scenes or (300 if smoke else 2000)
        rows.append(bench_make(root, "rooms", n))
        log(f"  make rooms, {n} scenes, {rows[-1]['workers']} processes: {rows[-1]['images_per_s']:.0f} images/s"
            f" (20,000 scenes would take {200_000 / rows[-1]['images_per_s'] / 60:.1f} min)")
        for workers in (0, 1, 2):
            rows.append(bench_loader(root, workers, batches=50 if smoke else 300))
            log(f"  loader B=36 K=9, {workers} worker threads: {rows[-1]['batches_per_s']:.0f} batches/s")
        if gpu is not None:
            rows.append(bench_loader(root, 2, batches=50 if smoke else 300, device=gpu))
            log(f"  loader B=36 K=9 + to_model_inputs on the GPU: {rows[-1]['batches_per_s']:.0f} batches/s")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--scenes", type=int, help="scenes for the `make` measurement (default 2000)")
    args = parser.parse_args(argv)
    print(f"data bench: {default_workers()} cores, torch {torch.__version__}")
    data_rows(args.smoke, scenes=args.scenes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
