"""Writing the built-in datasets: `make_dataset` (the `gqn-fast data make` command) and
`builtin_dataset`, the default training set generated into a cache folder on first use.

On the CPU, scenes are rendered in chunks by a pool of worker processes (one CPU thread
each, so every core works, and the caller's torch settings are left alone) that write
straight into the memory-mapped arrays of the split: nothing but one chunk per worker is
ever in memory. On a GPU they are rendered in this process, in bigger chunks. A set is built in a temporary
folder beside its destination and renamed into place once complete, so an interrupted run
leaves no half-written dataset behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from gqn_fast.data.cache import default_cache_dir
from gqn_fast.data.camera import FOV_DEGREES
from gqn_fast.data.catalog import DEFAULT_SCENES, DEFAULT_SEED, TEST_FRACTION
from gqn_fast.data.format import SPLITS, SplitWriter, open_split
from gqn_fast.data.scenes import check_holdout, get_family, render_scenes
from gqn_fast.data.workers import default_workers, worker_pool
from gqn_fast.errors import Interrupted, UsageError, check_count

# Scenes per task: a few hundred images, enough to amortise the renderer's set-up.
CHUNK_SCENES = 32
GPU_CHUNK_SCENES = 1024
# Below this many scenes a second worker process costs more than it saves.
MIN_SCENES_FOR_WORKERS = 256


def split_sizes(scenes: int, test_fraction: float = TEST_FRACTION) -> dict[str, int]:
    """Scenes per split: test gets round(scenes * test_fraction), at least one; train the rest."""
    if not isinstance(scenes, int) or isinstance(scenes, bool) or scenes < 2:
        raise UsageError(f"scenes: expected an int >= 2 (one train and one test scene), got {scenes!r}")
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    test = min(scenes - 1, max(1, round(scenes * test_fraction)))
    return {"train": scenes - test, "test": test}


# Worker side: each process keeps its split arrays open across tasks.
_open_writers: dict = {}


def _worker_init() -> None:
    # One thread per process: the renderer's ops are too short for OpenMP (see render.py).
    # Done only here, in a process of our own: toggling threads in a process that goes on
    # running torch leaves its small ops slow.
    torch.set_num_threads(1)


def _render_chunk(task) -> int:
    out, family, seed, split, start, stop, num_scenes, num_views, device, holdout = task
    key = (out, split)
    if key not in _open_writers:
        _open_writers[key] = SplitWriter(Path(out) / split, num_scenes, num_views, resume=True)
    images, cameras = render_scenes(family, seed, split, start, stop, device=device, holdout=holdout)
    _open_writers[key].write(start, images, cameras)
    return (stop - start) * num_views


def _write_splits(
    out: Path,
    family: str,
    seed: int,
    sizes: dict,
    workers: int,
    device,
    progress: bool,
    chunk: int,
    holdout: str | None,
):
    num_views = get_family(family).num_views
    writers = {split: SplitWriter(out / split, n, num_views) for split, n in sizes.items()}
    tasks = [
        (str(out), family, seed, split, start, min(start + chunk, n), n, num_views, device, holdout)
        for split, n in sizes.items()
        for start in range(0, n, chunk)
    ]
    total = sum(sizes.values()) * num_views
    on_cpu = device is None or torch.device(device).type == "cpu"
    bar = tqdm(total=total, unit="img", desc=f"{family} -> {out.name}", disable=not progress)
    try:
        if on_cpu:
            # A forked child is safe with torch because _worker_init drops it to one thread.
            with worker_pool(workers, initializer=_worker_init) as pool:
                for images in pool.imap_unordered(_render_chunk, tasks):
                    bar.update(images)
        else:
            for task in tasks:
                bar.update(_render_chunk(task))
    finally:
        bar.close()
        _open_writers.clear()
    return writers


def make_dataset(
    out,
    family: str = "rooms",
    scenes: int = DEFAULT_SCENES,
    seed: int = DEFAULT_SEED,
    test_fraction: float = TEST_FRACTION,
    workers: int | None = None,
    device=None,
    progress: bool = True,
    overwrite: bool = False,
    chunk: int | None = None,
    holdout: str | None = None,
) -> Path:
    """Render a built-in dataset (train and test splits) into the folder `out`; returns it.

    `scenes` counts both splits (test: `test_fraction` of them). `workers` processes render on
    the CPU (default: one per core, or 1 for small sets); with a CUDA `device` the renderer
    runs there instead, in this process. `chunk`: scenes per rendering task.
    """
    get_family(family)
    sizes = split_sizes(scenes, test_fraction)
    check_count("seed", seed, 0)
    if workers is None:
        workers = default_workers() if scenes >= MIN_SCENES_FOR_WORKERS else 1
    check_count("workers", workers)
    if chunk is None:
        on_gpu = device is not None and torch.device(device).type != "cpu"
        chunk = GPU_CHUNK_SCENES if on_gpu else CHUNK_SCENES
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = _write_splits(tmp, family, seed, sizes, workers, device, progress, chunk, holdout)
        for writer in writers.values():
            writer.finish(
                name=family,
                source=f"gqn-fast built-in renderer: {family}, seed {seed}",
                generator={
                    "family": family,
                    "seed": seed,
                    "fov_degrees": FOV_DEGREES,
                    "scenes": scenes,
                    "holdout": holdout,
                },
            )
        del writers
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Interrupted(f"nothing kept: {out} was not written (its partial files are removed)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_complete(root) -> bool:
    """True when every split of the dataset at `root` opens and checks out."""
    try:
        for split in SPLITS:
            open_split(Path(root) / split)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock across processes (e.g. every rank of a torchrun job); POSIX only."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the rename still keeps the set whole
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def builtin_dataset(
    name: str = "rooms",
    scenes: int = DEFAULT_SCENES,
    seed: int = DEFAULT_SEED,
    cache_dir=None,
    progress: bool = True,
    workers: int | None = None,
    device=None,
    holdout: str | None = None,
) -> Path:
    """The built-in dataset `name` ("rooms", "shepard_metzler", "shepard_metzler_7") of
    `scenes` scenes: its folder `<cache>/<name>-<scenes>-<seed>[-holdout-<holdout>]`, generated
    on first use. Scene i of a split is the same whatever `scenes` is, so a smaller set's test
    split is the first scenes of a larger one's.

    The cache is `cache_dir`, else $GQN_FAST_CACHE, else ~/.cache/gqn_fast. Concurrent
    callers wait on a lock file, and only one of them generates.
    """
    get_family(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    check_holdout(holdout)
    root = cache / (f"{name}-{scenes}-{seed}" + (f"-holdout-{holdout}" if holdout else ""))
    with _file_lock(cache / f".{root.name}.lock"):
        if is_complete(root):
            return root
        if root.exists():
            shutil.rmtree(root)  # an incomplete set from an older version or a crash
        for stale in cache.glob(f"{root.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
        return make_dataset(
            root, name, scenes, seed, workers=workers, device=device, progress=progress, holdout=holdout
        )


def dataset_summary(root) -> str:
    """One line per split: scenes, views, source."""
    lines = []
    for split in SPLITS:
        images, _, manifest = open_split(Path(root) / split)
        lines.append(
            f"{split}: {manifest['num_scenes']} scenes x {manifest['num_views']} views "
            f"({images.nbytes / 2**30:.2f} GiB) from {manifest['source']}"
        )
    return "\n".join(lines)
