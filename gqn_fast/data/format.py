"""The on-disk dataset format (docs/spec.md, "Data on disk"): writer, reader and manifest.

A dataset is a folder with `train/` and `test/`; each split holds
    images.npy     uint8   (N, T, 64, 64, 3), read with memory mapping
    cameras.npy    float32 (N, T, 5) as (x, y, z, yaw, pitch), radians
    manifest.json  name, split, num_scenes (N), num_views (T), image_size, source, version
The manifest is written last, so a split without one is unfinished. Every problem found
when opening a split raises DatasetFormatError naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gqn_fast.data.catalog import SPLITS  # noqa: F401  (re-exported: the splits of the format)
from gqn_fast.errors import UserError

FORMAT_VERSION = 1
IMAGE_SIZE = 64
IMAGES, CAMERAS, MANIFEST = "images.npy", "cameras.npy", "manifest.json"
MANIFEST_KEYS = ("name", "split", "num_scenes", "num_views", "image_size", "source", "version")


class DatasetFormatError(UserError, ValueError):
    """A dataset file is missing, unreadable or disagrees with the format or its manifest."""


def write_json_atomic(path: Path, value) -> None:
    """Write JSON to a temporary file and rename it, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_npy(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing")
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        # numpy says "mmap length is greater than file size" for a truncated file.
        raise DatasetFormatError(f"{path}: not a readable .npy array (truncated or corrupt?): {error}") from None
    if not array.flags.c_contiguous:
        raise DatasetFormatError(f"{path}: expected a C-ordered array, got Fortran order")
    size, expected = path.stat().st_size, array.offset + array.nbytes
    if size != expected:  # numpy maps a file with extra bytes without a word
        raise DatasetFormatError(
            f"{path}: {size} bytes, but its header's shape {tuple(array.shape)} makes {expected} (a damaged copy?)"
        )
    return array


def _check_array(path: Path, array: np.ndarray, dtype, tail: tuple, what: str) -> None:
    if array.dtype != dtype:
        raise DatasetFormatError(f"{path}: expected dtype {np.dtype(dtype)}, got {array.dtype}")
    if array.ndim != 2 + len(tail) or tuple(array.shape[2:]) != tail:
        raise DatasetFormatError(f"{path}: expected shape {what}, got {tuple(array.shape)}")


def read_manifest(split_dir: Path) -> dict:
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing (the split is unfinished or not a gqn-fast dataset)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetFormatError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DatasetFormatError(f"{path}: missing keys {missing}")
    if manifest["version"] != FORMAT_VERSION:
        raise DatasetFormatError(f"{path}: format version {manifest['version']!r}, this reader knows {FORMAT_VERSION}")
    for key in ("num_scenes", "num_views", "image_size"):
        value = manifest[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DatasetFormatError(f"{path}: {key} must be a non-negative int, got {value!r}")
    return manifest


def open_split(split_dir, mode: str = "r") -> tuple[np.ndarray, np.ndarray, dict]:
    """(images memmap, cameras memmap, manifest) of one split, after checking they agree."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetFormatError(f"{split_dir}: no such split folder")
    manifest = read_manifest(split_dir)
    size = IMAGE_SIZE
    images = _open_npy(split_dir / IMAGES, mode)
    _check_array(split_dir / IMAGES, images, np.uint8, (size, size, 3), f"(N, T, {size}, {size}, 3)")
    cameras = _open_npy(split_dir / CAMERAS, mode)
    _check_array(split_dir / CAMERAS, cameras, np.float32, (5,), "(N, T, 5)")
    if images.shape[:2] != cameras.shape[:2]:
        raise DatasetFormatError(
            f"{split_dir / CAMERAS}: (N, T) = {cameras.shape[:2]} disagrees with {IMAGES}'s {images.shape[:2]}"
        )
    where = split_dir / MANIFEST
    if manifest["image_size"] != size:
        raise DatasetFormatError(f"{where}: image_size {manifest['image_size']}, expected {size}")
    if (manifest["num_scenes"], manifest["num_views"]) != images.shape[:2]:
        raise DatasetFormatError(
            f"{where}: says (num_scenes, num_views) = ({manifest['num_scenes']}, {manifest['num_views']}), "
            f"but {IMAGES} holds {images.shape[:2]}"
        )
    step = 1 << 16
    for start in range(0, cameras.shape[0], step):
        finite = np.isfinite(cameras[start : start + step]).all(axis=(1, 2))
        if not finite.all():
            bad = start + int(np.argmin(finite))
            raise DatasetFormatError(f"{split_dir / CAMERAS}: scene {bad} has a NaN or infinite camera")
    return images, cameras, manifest


class SplitWriter:
    """Streams scenes into a pre-allocated split: images.npy and cameras.npy are created at their
    final size (sparse until written) and filled slice by slice with positioned writes (ten times
    faster than assigning into a fresh memory map, which takes a page fault per 4 KiB, and safe
    from several processes at once, each writing its own scenes); `finish` writes the manifest.

    With `resume=True` the existing arrays are reopened (their shape must match) and what
    they already hold is kept.
    """

    def __init__(self, split_dir, num_scenes: int, num_views: int, resume: bool = False):
        if num_scenes < 0 or num_views < 1:
            raise ValueError(f"num_scenes, num_views: expected >= 0 and >= 1, got {num_scenes}, {num_views}")
        self.split_dir = Path(split_dir)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.num_scenes, self.num_views = num_scenes, num_views
        size = IMAGE_SIZE
        self.shapes = {IMAGES: (num_scenes, num_views, size, size, 3), CAMERAS: (num_scenes, num_views, 5)}
        self.dtypes = {IMAGES: np.dtype(np.uint8), CAMERAS: np.dtype(np.float32)}
        self._files, self._offsets = {}, {}
        for name, shape in self.shapes.items():
            path = self.split_dir / name
            if resume and path.is_file():
                array = _open_npy(path, "r")
                if array.shape != shape or array.dtype != self.dtypes[name]:
                    raise DatasetFormatError(
                        f"{path}: cannot resume, holds {array.dtype} {array.shape}, "
                        f"expected {self.dtypes[name]} {shape}"
                    )
                self._offsets[name] = array.offset
                del array
                self._files[name] = open(path, "r+b")
            else:
                f = self._files[name] = open(path, "w+b")
                header = {
                    "descr": np.lib.format.dtype_to_descr(self.dtypes[name]),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_1_0(f, header)
                self._offsets[name] = f.tell()
                f.flush()
                f.truncate(f.tell() + int(np.prod(shape)) * self.dtypes[name].itemsize)

    def _write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
        row_bytes = int(np.prod(self.shapes[name][1:])) * self.dtypes[name].itemsize
        position, fd = self._offsets[name] + start * row_bytes, self._files[name].fileno()
        while data:  # a regular file takes it all at once but for a signal or a full disk
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written

    def write(self, start: int, images: np.ndarray, cameras: np.ndarray) -> None:
        """Scenes start..start+n-1: images uint8 [n, T, 64, 64, 3], cameras float32 [n, T, 5]."""
        n = images.shape[0]
        row_shape = self.shapes[IMAGES][1:]
        if images.shape[1:] != row_shape or images.dtype != np.uint8:
            raise ValueError(
                f"images: expected uint8 [n, {', '.join(map(str, row_shape))}], got {images.dtype} {list(images.shape)}"
            )
        if cameras.shape != (n, self.num_views, 5):
            raise ValueError(f"cameras: expected [{n}, {self.num_views}, 5], got {list(cameras.shape)}")
        if not 0 <= start <= self.num_scenes - n:
            raise ValueError(f"start: scenes {start}..{start + n - 1} do not fit in {self.num_scenes}")
        self._write_rows(IMAGES, start, images)
        self._write_rows(CAMERAS, start, cameras.astype(np.float32, copy=False))

    def flush(self) -> None:
        for f in self._files.values():
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __del__(self):  # a writer dropped without finish (an error, a worker's exit) closes its files
        for f in getattr(self, "_files", {}).values():
            f.close()

    def finish(self, name: str, source: str, **extra) -> dict:
        """Flush the arrays to disk, then write the manifest (the mark of a finished split)."""
        self.flush()
        self.close()
        manifest = {
            "name": name,
            "split": self.split_dir.name,
            "num_scenes": self.num_scenes,
            "num_views": self.num_views,
            "image_size": IMAGE_SIZE,
            "source": source,
            "version": FORMAT_VERSION,
            "camera": "x, y, z, yaw, pitch (radians)",
            **extra,
        }
        write_json_atomic(self.split_dir / MANIFEST, manifest)
        return manifest


def shrink_npy(path, num_rows: int) -> None:
    """Cut a .npy file to its first `num_rows` rows in place (the header keeps its length)."""
    path = Path(path)
    with open(path, "rb+") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if fortran or not 0 <= num_rows <= shape[0]:
            raise ValueError(f"{path}: cannot shrink {shape} to {num_rows} rows")
        new_shape = (num_rows, *shape[1:])
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": new_shape}
        start = 10 if version == (1, 0) else 12  # magic, version and the header's length field
        text = repr(header).encode("latin1")
        if len(text) + 1 > offset - start:
            raise ValueError(f"{path}: the new header does not fit")  # cannot happen: fewer digits
        f.seek(start)
        f.write(text.ljust(offset - start - 1) + b"\n")
        f.truncate(offset + int(np.prod(new_shape)) * dtype.itemsize)


class NpyAppender:
    """Writes a .npy file row block by row block when the number of rows is known only at
    the end: the header is written for a huge placeholder count, which `close` rewrites."""

    _PLACEHOLDER_ROWS = 10**15

    def __init__(self, path, dtype, row_shape: tuple):
        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._file = open(self.path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self._PLACEHOLDER_ROWS, *self.row_shape),
        }
        np.lib.format.write_array_header_1_0(self._file, header)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows: expected shape [n, {', '.join(map(str, self.row_shape))}], got {list(rows.shape)}")
        self._file.write(rows.data)
        self.rows += rows.shape[0]

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        shrink_npy(self.path, self.rows)
