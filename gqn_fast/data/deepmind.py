"""Converting DeepMind's gqn-datasets (TFRecords of tf.train.Example) to the on-disk format.

Each record is one scene: `frames`, T JPEG-encoded RGB images of the dataset's size, and
`cameras`, T * 5 floats (x, y, z, yaw, pitch). Frames of 128 px and 84 px sets are resized
to 64 px with a box (area) filter, which, unlike DeepMind's own bilinear resize, does not
alias.

The conversion runs one source file per task in a pool of processes. A task streams its
scenes into a part (two .npy files under OUT/<split>/.parts/) and marks it done only once
it is complete; a later run skips done files, so a stopped conversion resumes where it was.
When every file of a split is done, the parts are copied, in file order, into the split's
images.npy / cameras.npy (also resumable), the manifest is written and the parts removed.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from gqn_fast.data.format import IMAGE_SIZE, SPLITS, NpyAppender, SplitWriter, write_json_atomic
from gqn_fast.data.tfrecord import CorruptRecordError, parse_example, read_records


@dataclass(frozen=True)
class DeepMindDataset:
    name: str
    num_views: int  # T, views per scene
    image_size: int  # frame size in the TFRecords, resized to 64
    train_files: int  # record files in the original release
    test_files: int


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


def get_dataset(name: str) -> DeepMindDataset:
    if name not in DEEPMIND_DATASETS:
        raise ValueError(f"dataset: expected one of {sorted(DEEPMIND_DATASETS)}, got {name!r}")
    return DEEPMIND_DATASETS[name]


def source_files(src, name: str, split: str) -> list[Path]:
    """The TFRecord files of a split: SRC/<name>/<split>/ or, if SRC is the dataset's own
    folder, SRC/<split>/; sorted by name (DeepMind's 0001-of-2160.tfrecord order)."""
    src = Path(src)
    for folder in (src / name / split, src / split):
        if folder.is_dir():
            return sorted(p for p in folder.iterdir() if p.is_file() and ".tfrecord" in p.name)
    raise FileNotFoundError(f"{src}: no {name}/{split}/ or {split}/ folder of TFRecord files")


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
    images = np.empty((info.num_views, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for t, jpeg in enumerate(frames):
        try:
            with Image.open(io.BytesIO(jpeg)) as image:
                image = image.convert("RGB")
        except Exception as error:  # PIL raises many types for bad data
            raise ValueError(f"frame {t}: not a decodable image: {error}") from None
        if image.size != (info.image_size, info.image_size):
            raise ValueError(f"frame {t}: expected {info.image_size}x{info.image_size}, got {image.size[0]}x{image.size[1]}")
        if info.image_size != IMAGE_SIZE:
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        images[t] = np.asarray(image)
    return images, cameras.reshape(info.num_views, 5)


def _part_paths(part_dir: Path, source: Path) -> tuple[Path, Path, Path]:
    stem = source.name
    return part_dir / f"{stem}.images.npy", part_dir / f"{stem}.cameras.npy", part_dir / f"{stem}.done.json"


def convert_file(source, part_dir, name: str, skip_corrupt: bool = False) -> dict:
    """Convert one TFRecord file into a part; returns its done record
    {"file", "scenes", "skipped": [[index, problem], ...]}."""
    info, source, part_dir = get_dataset(name), Path(source), Path(part_dir)
    images_path, cameras_path, done_path = _part_paths(part_dir, source)
    T = info.num_views
    images = NpyAppender(images_path, np.uint8, (T, IMAGE_SIZE, IMAGE_SIZE, 3))
    cameras = NpyAppender(cameras_path, np.float32, (T, 5))
    skipped = []
    try:
        records = read_records(source)
        index = 0
        while True:
            try:
                data = next(records)
            except StopIteration:
                break
            except CorruptRecordError as error:
                # The framing is lost: nothing after this point can be read.
                if not skip_corrupt:
                    raise
                skipped.append([error.index, f"{error.problem}; the rest of the file is unreadable"])
                break
            try:
                scene_images, scene_cameras = decode_scene(data, info)
            except ValueError as error:
                if not skip_corrupt:
                    raise CorruptRecordError(source, index, str(error)) from None
                skipped.append([index, str(error)])
            else:
                images.append(scene_images[None])
                cameras.append(scene_cameras[None])
            index += 1
    finally:
        images.close()
        cameras.close()
    done = {"file": source.name, "scenes": images.rows, "skipped": skipped}
    write_json_atomic(done_path, done)
    return done


def _convert_task(args) -> dict:
    return convert_file(*args)


def _assemble(split_dir: Path, files: list[Path], info: DeepMindDataset, source_label: str) -> dict:
    """Copy the parts of a split, in file order, into its arrays; resumable; writes the manifest."""
    part_dir = split_dir / PARTS
    done = [json.loads(_part_paths(part_dir, f)[2].read_text()) for f in files]
    total = sum(d["scenes"] for d in done)
    progress_path = part_dir / "assembled.json"
    assembled = json.loads(progress_path.read_text()) if progress_path.is_file() else []
    writer = SplitWriter(split_dir, total, info.num_views, resume=bool(assembled))
    start = 0
    for source, record in zip(files, done):
        if source.name not in assembled:
            images_path, cameras_path, _ = _part_paths(part_dir, source)
            images, cameras = np.load(images_path, mmap_mode="r"), np.load(cameras_path, mmap_mode="r")
            step = 256
            for i in range(0, record["scenes"], step):
                writer.write(start + i, np.asarray(images[i : i + step]), np.asarray(cameras[i : i + step]))
            writer.flush()
            assembled.append(source.name)
            write_json_atomic(progress_path, assembled)
        start += record["scenes"]
    skipped = [[d["file"], index, problem] for d in done for index, problem in d["skipped"]]
    manifest = writer.finish(
        name=info.name,
        source=source_label,
        deepmind={"dataset": info.name, "source_files": len(files), "frame_size": info.image_size,
                  "skipped_records": skipped},
    )
    del writer
    shutil.rmtree(part_dir)
    return manifest


def convert_deepmind(src, out, name: str, splits=SPLITS, workers: int | None = None,
                     skip_corrupt: bool = False, progress: bool = True) -> dict:
    """Convert DeepMind dataset `name` from SRC (see `source_files`) to the dataset folder OUT.

    Returns {split: {"scenes", "files", "skipped": [[file, index, problem], ...]}}. Raises
    CorruptRecordError for a damaged record unless `skip_corrupt`; files finished before the
    error are kept, and running again resumes.
    """
    info = get_dataset(name)
    out = Path(out)
    files = {split: source_files(src, name, split) for split in splits}
    for split, found in files.items():
        if not found:
            raise FileNotFoundError(f"{src}: no TFRecord files for the {split} split of {name}")
    todo = []
    for split, found in files.items():
        part_dir = out / split / PARTS
        manifest_path = out / split / "manifest.json"
        if manifest_path.is_file() and not part_dir.exists():
            held = json.loads(manifest_path.read_text()).get("name")
            if held != name:
                raise FileExistsError(f"{manifest_path}: {out} already holds dataset {held!r}, not {name!r}")
            continue  # this split was finished by an earlier run
        part_dir.mkdir(parents=True, exist_ok=True)
        todo += [(f, part_dir, name, skip_corrupt) for f in found if not _part_paths(part_dir, f)[2].is_file()]
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    first_error = None
    with tqdm(total=len(todo), unit="file", desc=f"{name} -> {out.name}", disable=not progress) as bar:
        if workers > 1 and len(todo) > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                pending = {pool.submit(_convert_task, task) for task in todo}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        if future.cancelled():
                            continue
                        if future.exception() is not None:
                            first_error = first_error or future.exception()
                            for other in pending:
                                other.cancel()  # those already running finish and are kept
                        else:
                            bar.update(1)
        else:
            for task in todo:
                try:
                    _convert_task(task)
                except CorruptRecordError as error:
                    first_error = error
                    break
                bar.update(1)
    if first_error is not None:
        raise first_error
    label = f"DeepMind gqn-datasets {name} ({info.image_size} px frames, resized to 64 px)" if info.image_size != 64 \
        else f"DeepMind gqn-datasets {name}"
    report = {}
    for split, found in files.items():
        split_dir = out / split
        if (split_dir / PARTS).exists():
            _assemble(split_dir, found, info, label)
        manifest = json.loads((split_dir / "manifest.json").read_text())
        report[split] = {
            "scenes": manifest["num_scenes"],
            "files": len(found),
            "expected_files": info.train_files if split == "train" else info.test_files,
            "skipped": manifest.get("deepmind", {}).get("skipped_records", []),
        }
    return report
