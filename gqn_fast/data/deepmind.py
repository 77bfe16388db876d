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

Commit protocol of a split OUT/<split>/; a kill at any moment leaves either the complete,
right data or a state the next run finishes:
1. One task per source file, in a pool of processes, streams its scenes into a part under
   .parts/ and then writes the part's mark, <file>.done.json (scenes, skipped records, the
   source's size). A part without its mark, or whose source changed size, is redone.
2. When every file is done, the parts are copied in file order into images.npy / cameras.npy;
   .parts/assembled.json lists the files copied so far, so a stopped copy resumes.
3. The arrays are flushed, then manifest.json is written: the one commit point. It lists the
   source files (name, size, scenes) it covers.
4. .parts is removed. A later run that finds the manifest never writes the arrays again: it
   removes what is left of .parts, checks the arrays against the manifest and refuses
   (FileExistsError) if the source files differ from those the manifest lists.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

try:
    import simplejpeg  # libjpeg-turbo without PIL's per-image object overhead
except ImportError:  # pragma: no cover - a dependency; --no-deps installs decode with PIL
    simplejpeg = None

from gqn_fast.data.format import (
    IMAGE_SIZE, MANIFEST, SPLITS, NpyAppender, SplitWriter, open_split, read_manifest, write_json_atomic,
)
from gqn_fast.data.resize import area_resize
from gqn_fast.data.tfrecord import CorruptRecordError, parse_example, scan_records


@dataclass(frozen=True)
class DeepMindDataset:
    name: str
    num_views: int  # T, views per scene
    image_size: int  # frame size in the TFRecords, resized to 64
    train_files: int  # record files in the original release
    test_files: int

    def file_count(self, split: str) -> int:
        """Record files of `split` in the original release."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        return self.train_files if split == "train" else self.test_files


DEEPMIND_DATASETS = {
    d.name: d
    for d in (
        DeepMindDataset("rooms_ring_camera", 10, 64, 2160, 240),
        DeepMindDataset("rooms_free_camera_no_object_rotations", 10, 64, 2160, 240),
        DeepMindDataset("rooms_free_camera_with_object_rotations", 10, 128, 2034, 226),
        DeepMindDataset("jaco", 11, 64, 3600, 400),
        DeepMindDataset("shepard_metzler_5_parts", 15, 64, 900, 100),
        DeepMindDataset("shepard_metzler_7_parts", 15, 64, 900, 100),
        DeepMindDataset("mazes", 300, 84, 1080, 120),
    )
}

PARTS = ".parts"


def source_name(index: int, count: int) -> str:
    """DeepMind's name of file `index` (from 1) of a split of `count` files: both numbers
    zero-padded to the digits of `count`, as data_reader.py's template makes them."""
    digits = len(str(count))
    return f"{index:0{digits}d}-of-{count:0{digits}d}.tfrecord"


def get_dataset(name: str) -> DeepMindDataset:
    if name not in DEEPMIND_DATASETS:
        raise ValueError(f"dataset: expected one of {sorted(DEEPMIND_DATASETS)}, got {name!r}")
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
    count = get_dataset(name).file_count(split)
    names = {source_name(i, count) for i in range(1, count + 1)}
    folder = source_folder(src, name, split)
    return sorted(p for p in folder.iterdir() if p.name in names and p.is_file())


def expected_names(name: str, split: str) -> str:
    """The names a split's files have, for messages: `001-of-900.tfrecord .. 900-of-900.tfrecord`."""
    count = get_dataset(name).file_count(split)
    return f"{source_name(1, count)} .. {source_name(count, count)}"


def decode_scene(data: bytes, info: DeepMindDataset) -> tuple[np.ndarray, np.ndarray]:
    """One record -> (images uint8 [T, 64, 64, 3], cameras float32 [T, 5]); ValueError if malformed."""
    features = parse_example(data)
    frames, cameras = features.get("frames"), features.get("cameras")
    if not isinstance(frames, list) or len(frames) != info.num_views:
        got = len(frames) if isinstance(frames, list) else type(frames).__name__
        raise ValueError(f"'frames': expected {info.num_views} JPEG strings, got {got}")
    if not isinstance(cameras, np.ndarray) or cameras.dtype != np.float32 or cameras.size != info.num_views * 5:
        got = cameras.size if isinstance(cameras, np.ndarray) else type(cameras).__name__
        raise ValueError(f"'cameras': expected {info.num_views * 5} floats, got {got}")
    size = info.image_size
    images = np.empty((info.num_views, size, size, 3), np.uint8)
    for t, jpeg in enumerate(frames):
        if not _decode_fast(jpeg, images[t]):
            _decode_pil(jpeg, images[t], t)
    if size != IMAGE_SIZE:
        images = area_resize(images, IMAGE_SIZE)
    return images, cameras.reshape(info.num_views, 5)


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


def _part_paths(part_dir: Path, source: Path) -> tuple[Path, Path, Path]:
    stem = source.name
    return part_dir / f"{stem}.images.npy", part_dir / f"{stem}.cameras.npy", part_dir / f"{stem}.done.json"


def _read_done(part_dir: Path, source: Path) -> dict | None:
    """The mark of a finished part, or None if the part is to be (re)done."""
    path = _part_paths(part_dir, source)[2]
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("bytes") == source.stat().st_size else None


def convert_file(source, part_dir, name: str, skip_corrupt: bool = False) -> dict:
    """Convert one TFRecord file into a part; returns its mark
    {"file", "bytes", "scenes", "skipped": [[index, problem], ...]}."""
    info, source, part_dir = get_dataset(name), Path(source), Path(part_dir)
    images_path, cameras_path, done_path = _part_paths(part_dir, source)
    size = source.stat().st_size
    T = info.num_views
    images = NpyAppender(images_path, np.uint8, (T, IMAGE_SIZE, IMAGE_SIZE, 3))
    cameras = NpyAppender(cameras_path, np.float32, (T, 5))
    skipped = []
    try:
        if size == 0:  # a valid TFRecord file of no records, but every file DeepMind released holds scenes
            empty = CorruptRecordError(source, 0, "the file is empty (0 bytes): a download that failed?")
            if not skip_corrupt:
                raise empty
            skipped.append([0, empty.problem])
        for index, data in scan_records(source):
            if isinstance(data, CorruptRecordError):  # a bad checksum or a broken frame
                if not skip_corrupt:
                    raise data
                skipped.append([index, data.problem])
                continue
            try:
                scene_images, scene_cameras = decode_scene(data, info)
            except ValueError as error:
                if not skip_corrupt:
                    raise CorruptRecordError(source, index, str(error)) from None
                skipped.append([index, str(error)])
            else:
                images.append(scene_images[None])
                cameras.append(scene_cameras[None])
    finally:
        images.close()
        cameras.close()
    done = {"file": source.name, "bytes": size, "scenes": images.rows, "skipped": skipped}
    write_json_atomic(done_path, done)
    return done


def _convert_task(args) -> dict:
    return convert_file(*args)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the pool
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (kill -9 leaves no one to stop it) exits within half a second."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _run(todo: list, workers: int, bar) -> None:
    """convert_file for each task; the first error stops the others (their parts are redone)."""
    if workers <= 1 or len(todo) <= 1:
        for task in todo:
            _convert_task(task)
            bar.update(1)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Leaving the block terminates the workers, also on an error or Ctrl-C.
    with context.Pool(min(workers, len(todo)), initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        for _ in pool.imap_unordered(_convert_task, todo):
            bar.update(1)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _clean_up(split_dir: Path) -> None:
    """Remove .parts and stray temporary files: only ever after the manifest is written; idempotent."""
    part_dir = split_dir / PARTS
    if part_dir.is_dir():
        for path in sorted(part_dir.iterdir()):
            _remove(path)
        part_dir.rmdir()
    for path in split_dir.glob(f".{MANIFEST}.tmp-*"):
        _remove(path)


def _assemble(split_dir: Path, files: list[Path], info: DeepMindDataset, source_label: str) -> dict:
    """Copy the parts of a split, in file order, into its arrays (resumable), then commit: the manifest."""
    part_dir = split_dir / PARTS
    done = [_read_done(part_dir, f) for f in files]
    for source, record in zip(files, done):
        if record is None:  # its part was marked done a moment ago
            raise FileExistsError(f"{source}: changed while it was being converted; run again to redo it")
    covered = [[d["file"], d["bytes"], d["scenes"]] for d in done]
    progress_path = part_dir / "assembled.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    copied = progress["copied"] if progress.get("files") == covered else []  # else the plan changed: start over
    total = sum(d["scenes"] for d in done)
    writer = SplitWriter(split_dir, total, info.num_views, resume=bool(copied))
    start = 0
    for source, record in zip(files, done):
        if source.name not in copied:
            images_path, cameras_path, _ = _part_paths(part_dir, source)
            images, cameras = np.load(images_path, mmap_mode="r"), np.load(cameras_path, mmap_mode="r")
            step = 256
            for i in range(0, record["scenes"], step):
                writer.write(start + i, np.asarray(images[i : i + step]), np.asarray(cameras[i : i + step]))
            del images, cameras
            writer.flush()
            copied.append(source.name)
            write_json_atomic(progress_path, {"files": covered, "copied": copied})
        start += record["scenes"]
    skipped = [[d["file"], index, problem] for d in done for index, problem in d["skipped"]]
    manifest = writer.finish(
        name=info.name,
        source=source_label,
        deepmind={"dataset": info.name, "source_files": len(files), "files": covered,
                  "frame_size": info.image_size, "skipped_records": skipped},
    )
    del writer
    _clean_up(split_dir)
    return manifest


def _check_finished(split_dir: Path, found: list[Path], name: str, folder: Path) -> None:
    """A split with a manifest: finish its clean-up, check it still covers the source and its arrays."""
    manifest = read_manifest(split_dir)
    if manifest["name"] != name:
        raise FileExistsError(f"{split_dir / MANIFEST}: {split_dir.parent} already holds dataset "
                              f"{manifest['name']!r}, not {name!r}")
    _clean_up(split_dir)
    covered = manifest.get("deepmind", {}).get("files")
    if covered is not None:
        was = {file: size for file, size, _ in covered}
        now = {f.name: f.stat().st_size for f in found}
        if was != now:
            changes = [f"{len(now.keys() - was.keys())} new", f"{len(was.keys() - now.keys())} gone",
                       f"{sum(was[f] != now[f] for f in was.keys() & now.keys())} changed in size"]
            examples = sorted(now.keys() ^ was.keys()) + sorted(f for f in was.keys() & now.keys() if was[f] != now[f])
            raise FileExistsError(
                f"{split_dir}: converted from {len(was)} files of {folder}, which now has {len(now)} "
                f"({', '.join(changes)}: {', '.join(examples[:3])}{', ...' if len(examples) > 3 else ''}); "
                f"a finished split is never extended: convert into a new folder, or delete {split_dir} to redo it")
    open_split(split_dir)  # the arrays agree with the manifest, else DatasetFormatError


def convert_deepmind(src, out, name: str, splits=SPLITS, workers: int | None = None,
                     skip_corrupt: bool = False, progress: bool = True) -> dict:
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
            raise FileNotFoundError(f"{folders[split]}: no TFRecord files named like {expected_names(name, split)} "
                                    f"for the {split} split of {name}")
    todo, finished = [], set()
    for split, found in files.items():
        split_dir = out / split
        if (split_dir / MANIFEST).exists():
            _check_finished(split_dir, found, name, folders[split])
            finished.add(split)
            continue
        part_dir = split_dir / PARTS
        part_dir.mkdir(parents=True, exist_ok=True)
        todo += [(f, part_dir, name, skip_corrupt) for f in found if _read_done(part_dir, f) is None]
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    with tqdm(total=len(todo), unit="file", desc=f"{name} -> {out.name}", disable=not progress) as bar:
        _run(todo, workers, bar)
    label = f"DeepMind gqn-datasets {name}" if info.image_size == IMAGE_SIZE else \
        f"DeepMind gqn-datasets {name} ({info.image_size} px frames, area-resized to {IMAGE_SIZE} px)"
    report = {}
    for split, found in files.items():
        split_dir = out / split
        manifest = read_manifest(split_dir) if split in finished else _assemble(split_dir, found, info, label)
        report[split] = {
            "scenes": manifest["num_scenes"],
            "files": len(found),
            "expected_files": info.file_count(split),
            "skipped": manifest.get("deepmind", {}).get("skipped_records", []),
        }
    return report
