"""What a --data folder holds: a converted dataset (train/ and test/ with manifest.json and
.npy arrays) or DeepMind's download (train/ and test/ of DeepMind-named TFRecords, or
DATASET/train and DATASET/test as `gqn-fast data convert-deepmind` accepts), and the dataset
that reads it: loader.SceneDataset or records.RecordDataset, which share one contract.

Which DeepMind set a download is: `dataset` when given, else the folder's name, else the one
set whose file count the files' names (`001-of-900.tfrecord`) say; else an error naming the
choices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from gqn_fast.data.catalog import DEEPMIND_DATASETS, SPLITS
from gqn_fast.data.format import IMAGES, MANIFEST
from gqn_fast.errors import UsageError

DOWNLOAD, CONVERTED = "download", "converted"
_RECORD_NAME = re.compile(r"(\d+)-of-(\d+)\.tfrecord")


class DataFolder(NamedTuple):
    """kind: DOWNLOAD or CONVERTED; dataset: the DeepMind set a download is (None for a converted
    folder, whose manifest names it); split_dirs: {split: folder}, a download's only."""

    kind: str
    dataset: str | None
    split_dirs: dict


def _record_counts(folder: Path) -> set[int]:
    """The release file counts the DeepMind-named files of a folder say (`-of-900`)."""
    if not folder.is_dir():
        return set()
    return {int(m.group(2)) for p in folder.iterdir() if (m := _RECORD_NAME.fullmatch(p.name))}


def _download_root(root: Path, dataset: str | None) -> tuple[Path, str | None] | None:
    """(the folder holding the split folders, the set its name says) of a download, None if `root`
    holds no DeepMind-named file in a split folder."""
    candidates = [(root, root.name)] + [(root / name, name) for name in DEEPMIND_DATASETS]
    if dataset is not None:
        candidates = [(root / dataset, dataset)] + candidates[:1]
    for folder, name in candidates:
        if any(_record_counts(folder / split) for split in SPLITS):
            return folder, name if name in DEEPMIND_DATASETS else None
    return None


def inspect_folder(root, dataset: str | None = None) -> DataFolder:
    """What `root` holds; UsageError where a download's set cannot be told or `dataset` is unknown."""
    root = Path(root)
    if dataset is not None and dataset not in DEEPMIND_DATASETS:
        raise UsageError(f"--dataset: expected one of {', '.join(sorted(DEEPMIND_DATASETS))}, got {dataset!r}")
    if any((root / split / MANIFEST).exists() or (root / split / IMAGES).exists() for split in SPLITS):
        return DataFolder(CONVERTED, None, {})
    found = _download_root(root, dataset)
    if found is None:
        return DataFolder(CONVERTED, None, {})  # SceneDataset names what is missing
    folder, named = found
    name = dataset or named
    if name is None:
        counts = set().union(*(_record_counts(folder / split) for split in SPLITS))
        sets = sorted(d.name for d in DEEPMIND_DATASETS.values() if {d.train_files, d.test_files} & counts)
        if len(sets) != 1:
            which = f"its files' names fit {', '.join(sets)}" if sets else "its files' names fit no set"
            raise UsageError(
                f"{root}: a DeepMind download, but which set? ({which}); pass --dataset, one of "
                f"{', '.join(sorted(DEEPMIND_DATASETS))}"
            )
        name = sets[0]
    return DataFolder(DOWNLOAD, name, {split: folder / split for split in SPLITS})


def open_dataset(
    root, split: str, dataset: str | None = None, skip_corrupt: bool = False, progress: bool = True, cache_dir=None
):
    """The dataset of split `split` of --data folder `root`: a SceneDataset for a converted folder,
    a RecordDataset (indexed on first use into `cache_dir`, default the cache folder; `skip_corrupt`
    leaving damaged records out) for a download."""
    from gqn_fast.data.loader import SceneDataset

    found = inspect_folder(root, dataset)
    if found.kind == CONVERTED:
        return SceneDataset(root, split)
    from gqn_fast.data.records import RecordDataset

    return RecordDataset(
        found.split_dirs[split],
        DEEPMIND_DATASETS[found.dataset],
        split,
        skip_corrupt=skip_corrupt,
        cache_dir=cache_dir,
        progress=progress,
    )


def scene_arrays(dataset) -> tuple:
    """(images [N, T, 64, 64, 3], cameras [N, T, 5], manifest) of a dataset, indexed by scene:
    a converted split's memory maps, or a download's scenes decoded on access."""
    from gqn_fast.data.records import DecodedScenes, RecordDataset

    if isinstance(dataset, RecordDataset):
        return DecodedScenes(dataset, "images"), DecodedScenes(dataset, "cameras"), dataset.manifest
    images, cameras = dataset.arrays()
    return images, cameras, dataset.manifest
