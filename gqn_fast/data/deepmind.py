"""Converting DeepMind's gqn-datasets (TFRecords of tf.train.Example) to the on-disk format.

Each record is one scene: `frames`, T JPEG-encoded RGB images of the dataset's size, and
`cameras`, T * 5 floats (x, y, z, yaw, pitch). Frames of 128 px and 84 px sets are shrunk to
64 px by an exact area resize (resize.py), and decoded by libjpeg-turbo's accurate DCT with
fancy upsampling, as TensorFlow decodes them (through simplejpeg where it is installed, else
PIL: the same bytes, simplejpeg at about twice the speed). Source files are those named as
DeepMind's reader (data_reader.py in deepmind/gqn-datasets) names them: file i of a split of n
files is `'{:0%d}-of-{:0%d}.tfrecord' % (d, d)` with d the digits of n, from 1, so
`001-of-900.tfrecord` for Shepard-Metzler's train split and `0001-of-2160.tfrecord` for
rooms_ring_camera's; anything else in the folder (macOS `._*` files, gsutil's half-downloaded
`*.tfrecord_.gstmp`, names of another split's count) is ignored. A partial download (any subset
of a split's files, gaps included) converts; an empty file is a failed download and is named.

Commit protocol of a split OUT/<split>/; every scene is written once, into its final place, and
a kill at any moment leaves either the complete, right data or a state the next run finishes:
1. The plan: each source file's records are counted from the TFRecord framing alone (lengths
   and their checksums, the payloads skipped), so each file's scenes have their rows in the
   split's arrays before any is decoded. images.npy / cameras.npy are made at the planned size
   (sparse), then .parts/plan.json (files, sizes, records) is written. A later run whose source
   listing differs from the plan starts the split over.
2. One task per source file, in a pool of processes, decodes its scenes straight into its rows
   of the arrays, flushes them and then writes its mark, .parts/<file>.done.json (scenes,
   skipped records, the source's size). A file without its mark is redone.
3. Where records were skipped (--skip-corrupt), each array is compacted: its rows copied,
   without the gaps, into .parts/compact/ and moved over the original, one array at a time
   (an array's row count says whether it is compacted yet).
4. The arrays are flushed, then manifest.json is written: the one commit point. It lists the
   source files (name, size, scenes) it covers.
5. .parts is removed. A later run that finds the manifest never writes the arrays again: it
   removes what is left of .parts, checks the arrays against the manifest and refuses
   (FileExistsError) if the source files differ from those the manifest lists.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from threadpoolctl import threadpool_limits
from tqdm import tqdm

try:
    import simplejpeg  # libjpeg-turbo without PIL's per-image object overhead
except ImportError:  # pragma: no cover - a dependency; --no-deps installs decode with PIL
    simplejpeg = None

from gqn_fast.data.catalog import DEEPMIND_DATASETS, DeepMindDataset
from gqn_fast.data.format import (
    CAMERAS,
    IMAGE_SIZE,
    IMAGES,
    MANIFEST,
    SPLITS,
    DatasetFormatError,
    NpyAppender,
    SplitWriter,
    open_split,
    read_manifest,
    write_json_atomic,
)
from gqn_fast.data.resize import area_resize
from gqn_fast.data.tfrecord import ByteStrings, CorruptRecordError, count_records, parse_example, scan_records
from gqn_fast.data.workers import worker_pool
from gqn_fast.errors import Interrupted, UsageError

PARTS = ".parts"


def source_name(index: int, count: int) -> str:
    """DeepMind's name of file `index` (from 1) of a split of `count` files: both numbers
    zero-padded to the digits of `count`, as data_reader.py's template makes them."""
    digits = len(str(count))
    return f"{index:0{digits}d}-of-{count:0{digits}d}.tfrecord"


def get_dataset(name: str) -> DeepMindDataset:
    if name not in DEEPMIND_DATASETS:
        raise UsageError(f"dataset: expected one of {sorted(DEEPMIND_DATASETS)}, got {name!r}")
    return DEEPMIND_DATASETS[name]


def source_folder(src, name: str, split: str) -> Path:
    """SRC/<name>/<split>/ or, if SRC is the dataset's own folder, SRC/<split>/."""
    src = Path(src)
    for folder in (src / name / split, src / split):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"{src}: no {name}/{split}/ or {split}/ folder of TFRecord files")


def source_files(src, name: str, split: str) -> list[Path]:
    """The TFRecord files of a split that DeepMind's reader would open (see `source_name`), in order."""
    return split_files(source_folder(src, name, split), name, split)


def split_files(folder, name: str, split: str) -> list[Path]:
    """The files of the split folder `folder` that DeepMind's reader would open, in order."""
    count = get_dataset(name).file_count(split)
    names = {source_name(i, count) for i in range(1, count + 1)}
    return sorted(p for p in Path(folder).iterdir() if p.name in names and p.is_file())


def expected_names(name: str, split: str) -> str:
    """The names a split's files have, for messages: `001-of-900.tfrecord .. 900-of-900.tfrecord`."""
    count = get_dataset(name).file_count(split)
    return f"{source_name(1, count)} .. {source_name(count, count)}"


def scene_features(data: bytes, info: DeepMindDataset) -> tuple[ByteStrings, np.ndarray]:
    """One record -> (frames: T JPEG strings, each copied out when read; cameras float32 [T, 5]),
    checked; ValueError naming a missing or malformed feature."""
    features = parse_example(data)
    for key in ("frames", "cameras"):
        if key not in features:
            raise ValueError(f"'{key}': missing (the record's features: {', '.join(sorted(features)) or 'none'})")
    frames, cameras = features["frames"], features["cameras"]
    if not isinstance(frames, ByteStrings) or len(frames) != info.num_views:
        got = len(frames) if isinstance(frames, ByteStrings) else type(frames).__name__
        raise ValueError(f"'frames': expected {info.num_views} JPEG strings, got {got}")
    if not isinstance(cameras, np.ndarray) or cameras.dtype != np.float32 or cameras.size != info.num_views * 5:
        got = cameras.size if isinstance(cameras, np.ndarray) else type(cameras).__name__
        raise ValueError(f"'cameras': expected {info.num_views * 5} floats, got {got}")
    return frames, cameras.reshape(info.num_views, 5)


def decode_frames(frames: Sequence[bytes], info: DeepMindDataset, views) -> np.ndarray:
    """Frames `views` of a scene -> uint8 [len(views), 64, 64, 3]: decoded, then area-resized
    where the set's frames are larger; ValueError naming a frame that is no image of the set's size."""
    if info.image_size != IMAGE_SIZE:
        return area_resize(_decoded(frames, info.image_size, views), IMAGE_SIZE)
    images = np.empty((len(views), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    decode_frames_into(frames, info, views, images)
    return images


def decode_frames_into(frames: Sequence[bytes], info: DeepMindDataset, views, out) -> None:
    """decode_frames written into `out`, one uint8 [64, 64, 3] array a view (a batch's rows: no
    copy of the images after their decode where the set's frames are 64 px)."""
    if info.image_size != IMAGE_SIZE:
        for dest, image in zip(out, decode_frames(frames, info, views)):
            dest[...] = image
        return
    for dest, t in zip(out, views):
        if not _decode_fast(frames[t], dest):
            _decode_pil(frames[t], dest, t)


def _decoded(frames: Sequence[bytes], size: int, views) -> np.ndarray:
    """Frames `views` decoded at the set's frame size: uint8 [len(views), size, size, 3]."""
    images = np.empty((len(views), size, size, 3), np.uint8)
    for image, t in zip(images, views):
        if not _decode_fast(frames[t], image):
            _decode_pil(frames[t], image, t)
    return images


def decode_scene(data: bytes, info: DeepMindDataset) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (images uint8 [T, 64, 64, 3], cameras float32 [T, 5]); ValueError if malformed."""
    frames, cameras = scene_features(data, info)
    return decode_frames(frames, info, range(info.num_views)), cameras


def _decode_fast(jpeg: bytes, out: np.ndarray) -> bool:
    """Decode an RGB or grey JPEG of out's size into `out` with simplejpeg; False where it cannot
    (not installed, another size or colour space, damaged data): PIL then decides."""
    if simplejpeg is None:
        return False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg)
        if (height, width) != out.shape[:2] or colorspace not in ("YCbCr", "RGB", "Gray"):
            return False
        # The accurate integer DCT and fancy upsampling: PIL's and TensorFlow's defaults.
        simplejpeg.decode_jpeg(jpeg, colorspace="RGB", fastdct=False, fastupsample=False, buffer=out)
    except ValueError:
        return False
    return True


def _decode_pil(jpeg: bytes, out: np.ndarray, t: int) -> None:
    """Decode frame `t` into `out` with PIL; ValueError naming the frame if it is no image of out's size."""
    try:
        image = Image.open(io.BytesIO(jpeg), formats=("JPEG",))
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"frame {t}: not a decodable image: no JPEG data") from None
    except Exception as error:  # PIL raises many types for bad data
        raise ValueError(f"frame {t}: not a decodable image: {error}") from None
    height, width = out.shape[:2]
    if image.size != (width, height):
        raise ValueError(f"frame {t}: expected {width}x{height}, got {image.size[0]}x{image.size[1]}")
    out[...] = np.frombuffer(image.tobytes(), np.uint8).reshape(height, width, 3)


@dataclass(frozen=True)
class FileTask:
    """One source file's share of a split: the rows its scenes go to."""

    source: Path
    split_dir: Path
    first_row: int  # its first scene's row in the split's arrays
    records: int  # its records, counted from the framing: at most this many scenes
    rows: int  # the split's arrays' rows (every file's records)


def _done_path(split_dir: Path, source: Path) -> Path:
    return split_dir / PARTS / f"{source.name}.done.json"


def _read_done(split_dir: Path, source: Path) -> dict | None:
    """The mark of a finished file, or None if the file is to be (re)done."""
    try:
        done = json.loads(_done_path(split_dir, source).read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("bytes") == source.stat().st_size else None


def empty_file_error(source: Path) -> CorruptRecordError:
    """An empty file is a valid TFRecord file of no records, but every released file holds scenes."""
    return CorruptRecordError(source, 0, "the file is empty (0 bytes): a download that failed?")


def _scenes(source: Path, info: DeepMindDataset, records: int, skip_corrupt: bool, skipped: list):
    """The decoded scenes of a file, in order; damaged records raise CorruptRecordError or, with
    `skip_corrupt`, are appended to `skipped` as [index, problem]."""
    if source.stat().st_size == 0:
        empty = empty_file_error(source)
        if not skip_corrupt:
            raise empty
        skipped.append([0, empty.problem])
    for index, data in scan_records(source):
        if isinstance(data, CorruptRecordError):  # a bad checksum or a broken frame
            if not skip_corrupt:
                raise data
            skipped.append([index, data.problem])
            continue
        if index >= records:  # more records than the plan counted: the file was rewritten
            raise FileExistsError(f"{source}: changed while it was being converted; run again to redo it")
        try:
            yield decode_scene(data, info)
        except ValueError as error:
            if not skip_corrupt:
                raise CorruptRecordError(source, index, str(error)) from None
            skipped.append([index, str(error)])


def _write_scenes(writer: SplitWriter, row: int, scenes: list) -> int:
    """Write (images, cameras) pairs from `row` on; returns how many."""
    if scenes:
        writer.write(row, np.stack([images for images, _ in scenes]), np.stack([cameras for _, cameras in scenes]))
    return len(scenes)


def convert_file(task: FileTask, name: str, skip_corrupt: bool = False) -> dict:
    """Decode one TFRecord file into its rows of the split's arrays, then mark it done; returns
    the mark {"file", "bytes", "scenes", "skipped": [[index, problem], ...]}."""
    info, source = get_dataset(name), Path(task.source)
    size = source.stat().st_size
    skipped, scenes = [], 0
    writer = SplitWriter(task.split_dir, task.rows, info.num_views, resume=True)
    try:
        # One BLAS thread: the resize's small products gain nothing from more, and with a worker
        # per core each worker's BLAS threads spin against the others' (mazes, 2 workers: 2.2x slower).
        with threadpool_limits(limits=1, user_api="blas"):
            batch = []
            for scene in _scenes(source, info, task.records, skip_corrupt, skipped):
                batch.append(scene)
                if len(batch) == 32:  # a few MB a write
                    scenes += _write_scenes(writer, task.first_row + scenes, batch)
                    batch = []
            scenes += _write_scenes(writer, task.first_row + scenes, batch)
        writer.flush()
    finally:
        writer.close()
    done = {"file": source.name, "bytes": size, "scenes": scenes, "skipped": skipped}
    write_json_atomic(_done_path(task.split_dir, source), done)
    return done


def _convert_task(args) -> dict:
    task, name, skip_corrupt = args
    return convert_file(task, name, skip_corrupt)


def _run(todo: list, workers: int, bar) -> None:
    """convert_file for each task; an error stops the others (their parts are redone), and the one
    raised is that of the first damaged file in order, whichever worker met its error first."""
    if workers <= 1 or len(todo) <= 1:
        for task in todo:
            _convert_task(task)
            bar.update(1)
        return
    # Leaving the block terminates the workers, also on an error or Ctrl-C.
    with worker_pool(min(workers, len(todo))) as pool:
        for _ in pool.imap(_convert_task, todo):
            bar.update(1)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _replace(source: Path, target: Path) -> None:
    os.replace(source, target)


def _empty_part_dir(part_dir: Path) -> None:
    """Remove what .parts holds (files and the compact/ folder), keeping the folder itself."""
    for path in sorted(part_dir.iterdir()):
        if path.is_dir():
            _empty_part_dir(path)
            path.rmdir()
        else:
            _remove(path)


def _clean_up(split_dir: Path) -> None:
    """Remove .parts and stray temporary files: only ever after the manifest is written; idempotent."""
    part_dir = split_dir / PARTS
    if part_dir.is_dir():
        _empty_part_dir(part_dir)
        part_dir.rmdir()
    for path in split_dir.glob(f".{MANIFEST}.tmp-*"):
        _remove(path)


def _plan(split_dir: Path, files: list[Path], num_views: int) -> list[FileTask]:
    """Each file's rows in the split's arrays; a new plan (and empty arrays) unless the split's
    plan.json was made for these same files and sizes."""
    part_dir = split_dir / PARTS
    plan_path = part_dir / "plan.json"
    listing = [[f.name, f.stat().st_size] for f in files]
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, ValueError):
        plan = None
    if plan is None or [entry[:2] for entry in plan["files"]] != listing:
        part_dir.mkdir(parents=True, exist_ok=True)
        _empty_part_dir(part_dir)  # marks of another plan (or of the part files older versions wrote)
        records = [count_records(f) for f in files]
        SplitWriter(split_dir, sum(records), num_views).close()
        plan = {"files": [entry + [n] for entry, n in zip(listing, records)]}
        write_json_atomic(plan_path, plan)
    rows = sum(n for _, _, n in plan["files"])
    tasks, first = [], 0
    for source, (_, _, n) in zip(files, plan["files"]):
        tasks.append(FileTask(source, split_dir, first, n, rows))
        first += n
    return tasks


def _compact(split_dir: Path, tasks: list[FileTask], done: list[dict]) -> None:
    """Close the gaps skipped records left (each file's scenes stand at the start of its rows):
    each array copied without them into .parts/compact/, then moved over the original."""
    rows, scenes = tasks[0].rows, sum(d["scenes"] for d in done)
    compact = split_dir / PARTS / "compact"
    compact.mkdir(exist_ok=True)
    for array_name in (IMAGES, CAMERAS):
        path = split_dir / array_name
        source = np.load(path, mmap_mode="r")
        if source.shape[0] == scenes:  # moved over before a stop
            continue
        if source.shape[0] != rows:
            raise FileExistsError(
                f"{path}: {source.shape[0]} rows, neither the plan's {rows} nor {scenes}; "
                f"delete {split_dir} to redo the split"
            )
        out = NpyAppender(compact / array_name, source.dtype, source.shape[1:])
        for task, record in zip(tasks, done):
            for start in range(0, record["scenes"], 256):
                stop = min(start + 256, record["scenes"])
                out.append(np.asarray(source[task.first_row + start : task.first_row + stop]))
        out.close()
        del source
        _replace(compact / array_name, path)


def _commit(split_dir: Path, tasks: list[FileTask], info: DeepMindDataset, source_label: str) -> dict:
    """Every file is done: close the gaps of skipped records, then commit: the manifest."""
    done = [_read_done(split_dir, task.source) for task in tasks]
    for task, record in zip(tasks, done):
        if record is None:  # marked done a moment ago, changed since
            raise FileExistsError(f"{task.source}: changed while it was being converted; run again to redo it")
    total = sum(d["scenes"] for d in done)
    skipped = [[d["file"], index, problem] for d in done for index, problem in d["skipped"]]
    if total == 0:  # nothing to train on: no manifest, so the split is not taken for a finished one
        first = f", the first {skipped[0][0]} record {skipped[0][1]}: {skipped[0][2]}" if skipped else ""
        raise DatasetFormatError(
            f"{split_dir}: no scene left to write ({len(skipped)} damaged records skipped{first}); "
            "nothing was committed"
        )
    if total != tasks[0].rows:
        _compact(split_dir, tasks, done)
    writer = SplitWriter(split_dir, total, info.num_views, resume=True)
    manifest = writer.finish(
        name=info.name,
        source=source_label,
        deepmind={
            "dataset": info.name,
            "source_files": len(tasks),
            "files": [[d["file"], d["bytes"], d["scenes"]] for d in done],
            "frame_size": info.image_size,
            "skipped_records": skipped,
        },
    )
    _clean_up(split_dir)
    return manifest


def _check_finished(split_dir: Path, found: list[Path], name: str, folder: Path) -> None:
    """A split with a manifest: finish its clean-up, check it still covers the source and its arrays."""
    manifest = read_manifest(split_dir)
    if manifest["name"] != name:
        raise FileExistsError(
            f"{split_dir / MANIFEST}: {split_dir.parent} already holds dataset {manifest['name']!r}, not {name!r}"
        )
    _clean_up(split_dir)
    covered = manifest.get("deepmind", {}).get("files")
    if covered is not None:
        was = {file: size for file, size, _ in covered}
        now = {f.name: f.stat().st_size for f in found}
        if was != now:
            changes = [
                f"{len(now.keys() - was.keys())} new",
                f"{len(was.keys() - now.keys())} gone",
                f"{sum(was[f] != now[f] for f in was.keys() & now.keys())} changed in size",
            ]
            examples = sorted(now.keys() ^ was.keys()) + sorted(f for f in was.keys() & now.keys() if was[f] != now[f])
            raise FileExistsError(
                f"{split_dir}: converted from {len(was)} files of {folder}, which now has {len(now)} "
                f"({', '.join(changes)}: {', '.join(examples[:3])}{', ...' if len(examples) > 3 else ''}); "
                f"a finished split is never extended: convert into a new folder, or delete {split_dir} to redo it"
            )
    open_split(split_dir)  # the arrays agree with the manifest, else DatasetFormatError


def convert_deepmind(
    src, out, name: str, splits=SPLITS, workers: int | None = None, skip_corrupt: bool = False, progress: bool = True
) -> dict:
    """Convert DeepMind dataset `name` from SRC (see `source_folder`) to the dataset folder OUT.

    Returns {split: {"scenes", "files", "expected_files", "skipped": [[file, index, problem], ...]}}.
    Raises CorruptRecordError for a damaged record unless `skip_corrupt` (then the record is
    skipped and reported, and reading goes on where the framing allows); files finished before
    the error are kept, and running again resumes. A finished split is checked, not redone.
    """
    info = get_dataset(name)
    out = Path(out)
    folders = {split: source_folder(src, name, split) for split in splits}
    files = {split: source_files(src, name, split) for split in splits}
    for split, found in files.items():
        if not found:
            raise FileNotFoundError(
                f"{folders[split]}: no TFRecord files named like {expected_names(name, split)} "
                f"for the {split} split of {name}"
            )
    todo, finished, tasks = [], set(), {}
    for split, found in files.items():
        split_dir = out / split
        if (split_dir / MANIFEST).exists():
            _check_finished(split_dir, found, name, folders[split])
            finished.add(split)
            continue
        tasks[split] = _plan(split_dir, found, info.num_views)
        todo += [(task, name, skip_corrupt) for task in tasks[split] if _read_done(split_dir, task.source) is None]
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    with tqdm(total=len(todo), unit="file", desc=f"{name} -> {out.name}", disable=not progress) as bar:
        try:
            _run(todo, workers, bar)
        except KeyboardInterrupt:
            raise Interrupted(
                f"the files converted so far ({bar.n} in this run) are kept in {out}, each whole; "
                f"the same command resumes"
            ) from None
    label = (
        f"DeepMind gqn-datasets {name}"
        if info.image_size == IMAGE_SIZE
        else f"DeepMind gqn-datasets {name} ({info.image_size} px frames, area-resized to {IMAGE_SIZE} px)"
    )
    report = {}
    for split, found in files.items():
        split_dir = out / split
        manifest = read_manifest(split_dir) if split in finished else _commit(split_dir, tasks[split], info, label)
        report[split] = {
            "scenes": manifest["num_scenes"],
            "files": len(found),
            "expected_files": info.file_count(split),
            "skipped": manifest.get("deepmind", {}).get("skipped_records", []),
        }
    return report
