"""Data pipeline throughput: `python bench/data_bench.py [--scenes N] [--smoke] [--only GROUP]`.

- render: the built-in renderer alone, one process on one CPU thread (images/s), and on the
  GPU when there is one.
- make: `gqn-fast data make rooms` end to end (render in one process per core, write to disk),
  images/s. The issue's bar: 500 images/s on 2 cores (20,000 scenes in under 7 minutes).
- loader: make_loader batches/s and scenes/s for the paper's batch (B = 36, M up to K = 9) with
  0, 1 and 2 worker threads, and with to_model_inputs on the device. The bar: 200 batches/s on
  2 cores, and on a GPU more than the graphed training step takes (a converted DeepMind split
  has the same format, so the same rate once its pages are in memory).
- convert: `gqn-fast data convert-deepmind` on synthetic TFRecords in DeepMind's layout and names
  (rendered rooms, JPEG quality 95; tests/deepmind_files.py writes them): records/s of
  decode_scene alone in one process, and of the whole conversion against the number of worker
  processes, for a 64 px, a 128 px and the 84 px set; with `--tensorflow PYTHON`, beside
  TensorFlow's tf.data reading and decoding the same files on as many cores (bench/tf_reader.py).
- feed: scenes/s the training loop receives (the loader's Batch, B = 36, M + 1 = 6 views of 64 px
  scenes, T = 15) from DeepMind's download as it is (records.RecordDataset, worker processes)
  and from the same scenes converted (memory-mapped arrays, worker threads), for 1 and 2 workers
  (up to one per core on a bigger host), with `--tensorflow PYTHON` beside tf.data reading and
  decoding the same views of the download on as many cores, interleaved, medians; each row also
  gives scenes per CPU second of every process and thread taking part (the rate per core); and
  where a download's scene goes (feed-parts: read and checksum, parse, JPEG decode per view, the
  batch's copy out of the slot a worker wrote it into), each timed alone in this process.

`data_rows(smoke, log)` returns one dict per measurement, for bench/run.py's results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from gqn_fast.data.builtin import _worker_init, default_workers, make_dataset
from gqn_fast.data.deepmind import DEEPMIND_DATASETS, convert_deepmind, decode_scene
from gqn_fast.data.loader import (
    BatchPlan,
    BatchPlanner,
    SceneLoader,
    batch_copied_from,
    make_loader,
    to_model_inputs,
)
from gqn_fast.data.render import render
from gqn_fast.data.scenes import get_family, sample_scenes
from gqn_fast.data.workers import worker_pool

# The TFRecord writer the converter's tests use (tests/deepmind_files.py), DeepMind's file names included.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from deepmind_files import file_name, jpeg, scene_record  # noqa: E402

GROUPS = ("render", "make", "loader", "convert", "feed")


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
    return dict(
        workload=workload,
        provider=provider,
        precision="uint8",
        median_ms=median * 1e3,
        p20_ms=q[0] * 1e3,
        p80_ms=q[3] * 1e3,
        **{f"{unit}_per_s": items / median},
        **extra,
    )


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
        with worker_pool(1, initializer=_worker_init) as pool:
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


def bench_loader(
    root, workers: int, batch_size: int = 36, max_context: int = 9, batches: int = 300, device=None
) -> dict:
    """make_loader batches/s (B = batch_size, M uniform in 1..max_context) after a warm-up
    epoch; with `device`, each batch also goes through to_model_inputs there."""
    loader = make_loader(
        root,
        "train",
        batch_size,
        max_context,
        seed=0,
        num_workers=workers,
        pin_memory=device is not None and torch.device(device).type == "cuda",
    )
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
    return _row(
        "loader",
        f"{workers}workers-{where}",
        [seconds / batches],
        1,
        "batches",
        batch=batch_size,
        max_context=max_context,
        measured_batches=batches,
        scenes_per_s=batches * batch_size / seconds,
    )


def write_deepmind_files(src: Path, name: str, files: int, records_per_file: int, distinct: int = 4) -> None:
    """SRC/<name>/train/<DeepMind's names of files 1..files>: `distinct` rendered rooms scenes at
    the set's frame size, cycled (a scene's T views repeat the rendered ones when T is larger)."""
    info = DEEPMIND_DATASETS[name]
    scenes, cameras = sample_scenes("rooms", 0, "train", 0, distinct)
    images = render(scenes, torch.from_numpy(cameras), image_size=info.image_size).numpy()
    records = [
        scene_record(
            [jpeg(images[i, t % images.shape[1]]) for t in range(info.num_views)],
            np.resize(cameras[i], (info.num_views, 5)),
        )
        for i in range(distinct)
    ]
    folder = src / name / "train"
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(folder / file_name(name, "train", f + 1), "wb") as out:
            out.write(b"".join(records[(f + k) % distinct] for k in range(records_per_file)))


def bench_decode(src: Path, name: str, repeats: int) -> dict:
    """decode_scene alone (protobuf, JPEG, resize) in this process: records/s."""
    from gqn_fast.data.tfrecord import read_records

    info = DEEPMIND_DATASETS[name]
    records = [r for path in sorted((src / name / "train").iterdir()) for r in read_records(path)]
    with threadpool_limits(limits=1, user_api="blas"):  # one core, as in a conversion worker
        seconds = _timed(lambda: [decode_scene(r, info) for r in records], repeats)
    return _row("decode", name, seconds, len(records), "records", frame_size=info.image_size, workers=1)


def _tensorflow_run(python: str, src: Path, name: str, workers: int, feed: tuple = ()) -> dict:
    """bench/tf_reader.py's result ({"records", "seconds": [one pass], ...}) under `python`, on
    `workers` cores; feed: (views, batches) for the feed's reading (tf_reader.py says what it does)."""
    command = [python, str(Path(__file__).with_name("tf_reader.py")), str(src), name, str(workers), "1"]
    command += [str(n) for n in feed]
    if hasattr(os, "sched_getaffinity") and shutil.which("taskset"):
        cores = sorted(os.sched_getaffinity(0))[:workers]  # TensorFlow's threads held to the workers' cores
        command = ["taskset", "-c", ",".join(map(str, cores))] + command
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_convert(src: Path, name: str, worker_counts, repeats: int, tensorflow: str | None = None) -> list[dict]:
    """convert_deepmind end to end (read, decode, write parts, assemble, fsync) per number of worker
    processes, and with `tensorflow` (an interpreter with TensorFlow) tf.data reading and decoding
    the same files on as many cores, all interleaved: records/s."""
    times = {(p, w): [] for w in worker_counts for p in ("gqn_fast", "tensorflow") if p == "gqn_fast" or tensorflow}
    records = 0
    for _ in range(repeats):
        for provider, workers in times:
            if provider == "tensorflow":
                result = _tensorflow_run(tensorflow, src, name, workers)
                records, seconds = result["records"], result["seconds"][0]
            else:
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    report = convert_deepmind(src, out, name, splits=("train",), workers=workers, progress=False)
                    seconds = time.perf_counter() - start
                    records = report["train"]["scenes"]
            times[provider, workers].append(seconds)
    return [
        _row(
            "convert",
            f"{name}-{provider}-{w}proc",
            t,
            records,
            "records",
            workers=w,
            frame_size=DEEPMIND_DATASETS[name].image_size,
            reader=provider,
        )
        for (provider, w), t in times.items()
    ]


# Files and records per file of the convert group's synthetic sets: about a second of work each.
CONVERT_SIZES = {"rooms_ring_camera": (8, 250), "rooms_free_camera_with_object_rotations": (8, 80), "mazes": (8, 4)}


def convert_rows(smoke: bool = False, log=print, tensorflow: str | None = None) -> list[dict]:
    try:
        import google_crc32c  # noqa: F401  (the TFRecord reader's checksums)
    except ImportError:
        log("  convert: skipped, google-crc32c is not installed (pip install google-crc32c)")
        return []
    rows = []
    cores = default_workers()
    worker_counts = sorted({1, 2, cores}) if not smoke else [1, 2]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        for name, (files, per_file) in CONVERT_SIZES.items():
            if smoke:
                files, per_file = 2, 2
            write_deepmind_files(src, name, files, per_file, distinct=1 if smoke else 4)
            rows.append(bench_decode(src, name, repeats=2 if smoke else 5))
            log(
                f"  decode_scene {name} ({DEEPMIND_DATASETS[name].image_size} px), 1 process:"
                f" {rows[-1]['records_per_s']:.1f} records/s"
            )
            measured = bench_convert(src, name, worker_counts, repeats=1 if smoke else 5, tensorflow=tensorflow)
            rows += measured
            for r in measured:
                what = "convert-deepmind" if r["reader"] == "gqn_fast" else "TensorFlow tf.data"
                log(f"  {what} {name}, {r['workers']} workers: {r['records_per_s']:.1f} records/s")
    return rows


class FixedContextPlanner(BatchPlanner):
    """The loader's planner with M fixed at max_context: every batch holds M + 1 views a scene."""

    def plan(self, batch: int, scenes: np.ndarray) -> BatchPlan:
        rng = np.random.default_rng([self.seed, self.epoch, batch, 1, self.rank])
        views = np.argsort(rng.random((len(scenes), self.num_views)), axis=1)[:, : self.max_context + 1]
        return BatchPlan(scenes, views)


def _cpu_seconds() -> tuple[float, set[int]]:
    """(CPU seconds, user and system, of this process's threads and of its live child processes
    (the loader's workers; read from /proc, so Linux only), the children's process ids)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, children = time.process_time(), multiprocessing.active_children()
    for child in children:
        with open(f"/proc/{child.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of stat
    return total, {child.pid for child in children}


def _feed_seconds(dataset, workers: int, epochs: int, batch_size: int = 36, views: int = 6) -> tuple[float, float]:
    """(seconds, CPU seconds of every process taking part) for the loader to hand out `epochs`
    whole epochs, after a warm-up epoch (whole passes: the workers serve them all)."""
    planner = FixedContextPlanner(dataset.num_scenes, dataset.num_views, batch_size, views - 1, seed=0)
    loader = SceneLoader(dataset, planner, num_workers=workers, processes=dataset.worker_processes)
    for _ in loader:  # the pool started, the pages read once
        pass
    start, (cpu_start, children) = time.perf_counter(), _cpu_seconds()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    seconds, (cpu_end, children_after) = time.perf_counter() - start, _cpu_seconds()
    loader.close()
    if children_after != children:  # a worker's CPU time left out
        raise RuntimeError(f"the loader's worker processes changed while timed: {children} -> {children_after}")
    return seconds, cpu_end - cpu_start


def bench_feed(
    download: Path,
    converted: Path,
    name: str,
    worker_counts,
    batches: int,
    repeats: int,
    cache: Path,
    tensorflow: str | None = None,
) -> list[dict]:
    """Scenes/s the training loop receives from the download and from its conversion, and with
    `tensorflow` (an interpreter with TensorFlow) what tf.data gives from the download reading and
    decoding the same views on as many cores, all interleaved. Whole epochs of 36-scene batches,
    at least `batches` of them (tf.data is given as many)."""
    from gqn_fast.data.folder import open_dataset

    datasets = {
        "download": open_dataset(download, "train", name, progress=False, cache_dir=cache),
        "converted": open_dataset(converted, "train"),
    }
    per_epoch = datasets["download"].num_scenes // 36
    epochs = -(-batches // per_epoch)
    batches = epochs * per_epoch
    sources = [*datasets, "tensorflow"] if tensorflow else list(datasets)
    times = {(source, w): [] for w in worker_counts for source in sources}
    cpu = {key: [] for key in times}
    for _ in range(repeats):
        for source, workers in times:
            if source == "tensorflow":
                result = _tensorflow_run(tensorflow, download.parent, name, workers, feed=(6, batches))
                seconds, cpu_seconds = result["seconds"][0], result["cpu_seconds"][0]
            else:
                seconds, cpu_seconds = _feed_seconds(datasets[source], workers, epochs)
            times[source, workers].append(seconds / batches)
            cpu[source, workers].append(cpu_seconds / batches)
    return [
        _row(
            "feed",
            f"{source}-{w}workers",
            t,
            36,
            "scenes",
            batch=36,
            views=6,
            workers=w,
            source=source,
            frame_size=64,
            measured_batches=batches,
            # scenes per CPU second, all the processes and threads taking part: the rate per core
            scenes_per_cpu_s=36 / statistics.median(cpu[source, w]),
            cpu_ms=statistics.median(cpu[source, w]) * 1e3,
        )
        for (source, w), t in times.items()
    ]


def bench_feed_parts(download: Path, name: str, scenes: int, repeats: int, cache: Path) -> list[dict]:
    """Where a download's scene goes, each part timed alone over `scenes` scenes: microseconds."""
    from gqn_fast.data.deepmind import decode_frames, scene_features
    from gqn_fast.data.folder import open_dataset
    from gqn_fast.data.tfrecord import masked_crc32c

    ds = open_dataset(download, "train", name, progress=False, cache_dir=cache)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, ds.num_scenes, scenes)
    views = [np.argsort(rng.random(ds.num_views))[:6] for _ in range(scenes)]
    where = [(ds._fd(int(ds.index.file[i])), int(ds.index.length[i]), int(ds.index.offset[i])) for i in picks]
    raws = [os.pread(fd, length + 4, offset) for fd, length, offset in where]
    payloads = [raw[:-4] for raw in raws]
    parsed = [scene_features(p, ds.info) for p in payloads]
    plan = BatchPlan(picks[:36], np.stack(views[:36]))
    arrays = ds.gather_arrays(plan)
    parts = {
        "read (pread)": (lambda: [os.pread(fd, n + 4, o) for fd, n, o in where], scenes),
        "checksum (CRC32C)": (lambda: [masked_crc32c(p) for p in payloads], scenes),
        "parse (tf.train.Example)": (lambda: [scene_features(p, ds.info) for p in payloads], scenes),
        "JPEG decode, per view": (
            lambda: [decode_frames(f, ds.info, v) for (f, _), v in zip(parsed, views)],
            scenes * 6,
        ),
        # What the training loop's process does with a batch a worker wrote into a shared slot.
        "the batch out of its shared slot, per scene": (
            lambda: batch_copied_from(arrays),
            36,
        ),
    }
    rows = []
    for part, (fn, items) in parts.items():
        seconds = _timed(fn, repeats)
        rows.append(
            _row("feed-parts", part, seconds, items, "items", microseconds=statistics.median(seconds) / items * 1e6)
        )
    return rows


# The feed group's set: 64 px scenes of 15 views, as Shepard-Metzler's, 4 files of 400 records.
FEED_SET = ("shepard_metzler_7_parts", 4, 400)


def write_feed_set(folder: Path, smoke: bool = False) -> tuple[Path, Path]:
    """The feed set as DeepMind ships it, in folder/src/<name>, and converted, in folder/converted:
    (the download's folder, the converted folder). Also what gpu_check trains on from both."""
    name, files, per_file = FEED_SET
    if smoke:
        files, per_file = 2, 40
    write_deepmind_files(folder / "src", name, files, per_file, distinct=4 if smoke else 16)
    convert_deepmind(folder / "src", folder / "converted", name, splits=("train",), progress=False)
    return folder / "src" / name, folder / "converted"


def feed_rows(smoke: bool = False, log=print, tensorflow: str | None = None) -> list[dict]:
    name = FEED_SET[0]
    cores = default_workers()
    worker_counts = [1, 2] if smoke or cores <= 2 else sorted({1, 2, 4, 8, 16} & set(range(1, cores + 1)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        download, converted = write_feed_set(Path(tmp), smoke)
        cache = Path(tmp) / "cache"  # the index goes with the files, not into the user's cache folder
        parts = bench_feed_parts(download, name, scenes=72 if smoke else 360, repeats=2 if smoke else 5, cache=cache)
        for r in parts:
            log(f"  feed part: {r['provider']}: {r['microseconds']:.1f} us")
        measured = bench_feed(
            download,
            converted,
            name,
            worker_counts,
            batches=8 if smoke else 100,
            repeats=1 if smoke else 5,
            cache=cache,
            tensorflow=tensorflow,
        )
    rows += parts + measured
    for r in measured:
        log(
            f"  feed B=36 M+1=6 64 px from the {r['source']}, {r['workers']} workers: {r['scenes_per_s']:.0f} "
            f"scenes/s, {r['scenes_per_cpu_s']:.0f} scenes per CPU second"
        )
    return rows


def data_rows(
    smoke: bool = False, log=print, scenes: int | None = None, groups=GROUPS, tensorflow: str | None = None
) -> list[dict]:
    rows = []
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    if "render" in groups:
        for family in ("rooms", "shepard_metzler"):
            rows.append(bench_render(family, scenes=16 if smoke else 64, repeats=2 if smoke else 5))
            log(f"  render {family}, 1 CPU thread: {rows[-1]['images_per_s']:.0f} images/s")
            if gpu is not None:
                rows.append(bench_render(family, scenes=64 if smoke else 2048, repeats=2 if smoke else 5, device=gpu))
                log(f"  render {family}, {torch.cuda.get_device_name(gpu)}: {rows[-1]['images_per_s']:.0f} images/s")
    if "make" in groups or "loader" in groups:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "rooms"
            n = scenes or (300 if smoke else 2000)
            make = bench_make(root, "rooms", n)
            if "make" in groups:
                rows.append(make)
                log(
                    f"  make rooms, {n} scenes, {make['workers']} processes: {make['images_per_s']:.0f} images/s"
                    f" (20,000 scenes would take {200_000 / make['images_per_s'] / 60:.1f} min)"
                )
            if "loader" in groups:
                for workers in (0, 1, 2):
                    rows.append(bench_loader(root, workers, batches=50 if smoke else 300))
                    log(
                        f"  loader B=36 K=9, {workers} worker threads: {rows[-1]['batches_per_s']:.0f} batches/s"
                        f" ({rows[-1]['scenes_per_s']:.0f} scenes/s)"
                    )
                if gpu is not None:
                    rows.append(bench_loader(root, 2, batches=50 if smoke else 300, device=gpu))
                    log(
                        f"  loader B=36 K=9 + to_model_inputs on the GPU: {rows[-1]['batches_per_s']:.0f} batches/s"
                        f" ({rows[-1]['scenes_per_s']:.0f} scenes/s)"
                    )
    if "convert" in groups:
        rows += convert_rows(smoke, log, tensorflow)
    if "feed" in groups:
        rows += feed_rows(smoke, log, tensorflow)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--scenes", type=int, help="scenes for the `make` measurement (default 2000)")
    parser.add_argument("--only", choices=GROUPS, action="append", help="run only this group (repeatable)")
    parser.add_argument(
        "--tensorflow",
        metavar="PYTHON",
        help="an interpreter with TensorFlow: the convert and feed groups time tf.data on the same files",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="a JSON file for the rows, with the machine, the command and the load (uptime) before and after",
    )
    parser.add_argument(
        "--write-feed-set",
        type=Path,
        metavar="FOLDER",
        help="only write the feed group's set into FOLDER, as downloaded (src/) and converted (converted/)",
    )
    args = parser.parse_args(argv)
    if args.write_feed_set is not None:
        download, converted = write_feed_set(args.write_feed_set, args.smoke)
        print(f"wrote {download} and {converted}")
        return 0
    print(f"data bench: {default_workers()} cores, torch {torch.__version__}")
    load_before = _uptime()
    rows = data_rows(args.smoke, scenes=args.scenes, groups=args.only or GROUPS, tensorflow=args.tensorflow)
    if args.out is not None:
        record = {
            "command": "python bench/data_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": _machine(),
            "load_before": load_before,
            "load_after": _uptime(),
            "commit": _commit(),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _uptime() -> str:
    """`uptime`'s line: the load of a machine others share, beside what was measured on it."""
    done = subprocess.run(["uptime"], capture_output=True, text=True)
    return done.stdout.strip()


def _machine() -> str:
    import platform

    model = ""
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else ""
    return f"{model or platform.processor()}, {default_workers()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
