"""Where each scene of a DeepMind download lies: the record index of one split.

The first use of a split walks its DeepMind-named files once (see deepmind.split_files),
checks every record's framing, payload checksum and features (`frames` and `cameras` of the
set's sizes), and keeps each located record's payload length. The index lives in the cache
folder (deepmind.py never writes into the download), at
    <cache>/record-index/<sha256 of the split folder's absolute path>.idx
laid out as
    MAGIC | uint64 header bytes | JSON header | uint32 payload length of each located record
with the header naming the split folder, the dataset and each file as [name, bytes, mtime_ns,
records located], and the damaged records as [file, index, problem]. Four bytes a record: the
offsets are the lengths' running sums. A split whose listing (names, sizes, mtimes) differs from
its index's is indexed again, saying why. Written to a temporary file and renamed into place:
an interrupted indexing leaves no index, and the next use starts it again.

Plain Python and NumPy (no torch): `gqn-fast data convert-deepmind` shares this module's imports.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from gqn_fast.data.cache import default_cache_dir
from gqn_fast.data.catalog import DeepMindDataset
from gqn_fast.data.deepmind import empty_file_error, expected_names, scene_features, split_files
from gqn_fast.data.format import DatasetFormatError
from gqn_fast.data.tfrecord import CorruptRecordError, scan_frames
from gqn_fast.data.workers import default_workers, worker_pool

INDEX_VERSION = 1
MAGIC = b"GQNRIDX1"
FRAMING = 12 + 4  # a record's bytes besides its payload: length, its checksum; the payload's checksum


class RecordIndex(NamedTuple):
    """The scenes of a split of DeepMind's download: scene i is record `record[i]` of file
    `files[file[i]]`, its payload `length[i]` bytes at byte `offset[i]`; `skipped` lists
    [file, index, problem] of the damaged records left out."""

    folder: Path
    files: list[str]
    file: np.ndarray  # int32 [N]
    record: np.ndarray  # int64 [N]
    offset: np.ndarray  # int64 [N]
    length: np.ndarray  # int64 [N]
    skipped: list


def index_path(folder, cache_dir=None) -> Path:
    """Where the index of the split folder `folder` is kept."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:32]
    return (
        Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "record-index" / f"{key}.idx"
    )


def _listing(files: list[Path]) -> list[list]:
    listing = []
    for f in files:
        stat = f.stat()
        listing.append([f.name, stat.st_size, stat.st_mtime_ns])
    return listing


def _scan_file(path: Path, info: DeepMindDataset) -> tuple[list[int], list[list]]:
    """(payload length of each located record, [[index, problem], ...] of the damaged ones)."""
    if path.stat().st_size == 0:
        return [], [[0, empty_file_error(path).problem]]
    lengths, bad = [], []
    for frame in scan_frames(path):
        data = frame.data
        if isinstance(data, CorruptRecordError):
            bad.append([frame.index, data.problem])
            if frame.length == 0:  # a broken frame: the last item, not located
                continue
        else:
            try:
                scene_features(data, info)
            except ValueError as error:
                bad.append([frame.index, str(error)])
        lengths.append(frame.length)
    return lengths, bad


def _scan_task(task: tuple[Path, DeepMindDataset]) -> tuple[list[int], list[list]]:
    return _scan_file(*task)


def _scans(files: list[Path], info: DeepMindDataset, workers: int):
    """_scan_file of each file, in order: in `workers` processes where there are several files
    (the parse of every record's features is most of the time, and one core's worth)."""
    if workers <= 1 or len(files) <= 1:
        yield from (_scan_file(path, info) for path in files)
        return
    # Leaving the block terminates the workers, also on an error or Ctrl-C.
    with worker_pool(min(workers, len(files))) as pool:
        yield from pool.imap(_scan_task, [(path, info) for path in files])


def build_index(
    folder: Path, files: list[Path], info: DeepMindDataset, progress: bool = True, workers: int | None = None
) -> tuple[dict, bytes]:
    """(header, lengths as uint32 bytes) of a split: every file walked once, in `workers`
    processes (default: one per core)."""
    listing = _listing(files)
    all_lengths, bad = [], []
    total = sum(size for _, size, _ in listing)
    scans = _scans(files, info, workers or default_workers())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"indexing {folder}", disable=not progress) as bar:
        for entry, path, (lengths, file_bad) in zip(listing, files, scans):
            entry.append(len(lengths))
            all_lengths += lengths
            bad += [[path.name, index, problem] for index, problem in file_bad]
            bar.update(entry[1])
    header = {
        "version": INDEX_VERSION,
        "folder": str(folder.resolve()),
        "dataset": info.name,
        "files": listing,
        "damaged": bad,
    }
    return header, np.asarray(all_lengths, "<u4").tobytes()


def write_index(path: Path, header: dict, lengths: bytes) -> None:
    """The index file, written whole to a temporary file and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(header).encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(text)) + text + lengths)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path) -> tuple[dict, np.ndarray] | None:
    """(header, uint32 lengths) of an index file, or None where there is none or it is unreadable
    (the cache's own file: it is made again)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    start = len(MAGIC) + 8
    if len(raw) < start or not raw.startswith(MAGIC):
        return None
    (size,) = struct.unpack("<Q", raw[len(MAGIC) : start])
    try:
        header = json.loads(raw[start : start + size])
        located = sum(entry[3] for entry in header["files"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    body = raw[start + size :]
    if header.get("version") != INDEX_VERSION or len(body) != 4 * located:
        return None
    return header, np.frombuffer(body, "<u4")


def _changes(was: list, now: list) -> str:
    """What differs between an index's listing and the folder's, for the message."""
    before = {name: (size, mtime) for name, size, mtime, *_ in was}
    after = {name: (size, mtime) for name, size, mtime in now}
    parts = [
        f"{len(after.keys() - before.keys())} new",
        f"{len(before.keys() - after.keys())} gone",
        f"{sum(before[f][0] != after[f][0] for f in before.keys() & after.keys())} resized",
        f"{sum(before[f] != after[f] and before[f][0] == after[f][0] for f in before.keys() & after.keys())} rewritten",
    ]
    return ", ".join(p for p in parts if not p.startswith("0 "))


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def open_index(
    folder,
    info: DeepMindDataset,
    split: str,
    skip_corrupt: bool = False,
    cache_dir=None,
    progress: bool = True,
    say: Callable[[str], None] = _say,
) -> RecordIndex:
    """The index of split folder `folder` of DeepMind set `info`, made on first use or when its
    files changed. A damaged record raises its CorruptRecordError (as the converter names it)
    unless `skip_corrupt`, which leaves them out and says how many; a split with no scene left
    raises DatasetFormatError."""
    folder = Path(folder)
    files = split_files(folder, info.name, split)
    if not files:
        raise FileNotFoundError(
            f"{folder}: no TFRecord files named like {expected_names(info.name, split)} for the {split} split of {info.name}"
        )
    path = index_path(folder, cache_dir)
    listing = _listing(files)
    found = read_index(path)
    header = lengths = None
    if found is not None and found[0].get("folder") == str(folder.resolve()) and found[0].get("dataset") == info.name:
        if [entry[:3] for entry in found[0]["files"]] == listing:
            header, lengths = found
        else:
            say(
                f"{folder}: its files changed since they were indexed ({_changes(found[0]['files'], listing)}); indexing again"
            )
    if header is None:
        header, raw = build_index(folder, files, info, progress)
        write_index(path, header, raw)
        lengths = np.frombuffer(raw, "<u4")
    return _good_records(folder, header, lengths, skip_corrupt, say)


def _good_records(folder: Path, header: dict, lengths: np.ndarray, skip_corrupt: bool, say) -> RecordIndex:
    """The good records of an index, in file then record order."""
    damaged = header["damaged"]
    if damaged and not skip_corrupt:
        name, index, problem = damaged[0]
        raise CorruptRecordError(folder / name, index, problem)
    counts = [entry[3] for entry in header["files"]]
    file = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    length = lengths.astype(np.int64)
    starts = np.cumsum([0] + counts[:-1]).astype(np.int64)  # each file's first record
    ends = np.concatenate([[0], np.cumsum(length + FRAMING)])  # record bytes before each record, all files
    offset = ends[:-1] + 12 - np.repeat(ends[starts], counts)  # a payload starts 12 bytes into its record
    names = [entry[0] for entry in header["files"]]
    keep = np.ones(length.size, bool)
    first = dict(zip(names, starts))
    for name, index, _ in damaged:
        if index < counts[names.index(name)]:  # a located record (not a broken frame's)
            keep[first[name] + index] = False
    if damaged:
        say(f"{folder}: skipped {len(damaged)} damaged record{'s' if len(damaged) != 1 else ''}")
    if not keep.any():
        raise DatasetFormatError(
            f"{folder}: no scene left ({len(damaged)} damaged record{'s' if len(damaged) != 1 else ''} "
            f"skipped, the first {damaged[0][0]} record {damaged[0][1]}: {damaged[0][2]})"
            if damaged
            else f"{folder}: no scene in its {len(names)} files"
        )
    record = np.arange(length.size) - np.repeat(starts, counts)
    return RecordIndex(folder, names, file[keep], record[keep], offset[keep], length[keep], damaged)
