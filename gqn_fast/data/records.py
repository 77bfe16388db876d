"""Training on DeepMind's download as it is: a dataset that reads the TFRecords.

RecordDataset has the memory-mapped SceneDataset's contract (num_scenes, num_views,
gather(plan) -> Batch, ds[i] -> (images, cameras)), so the batch planner, exact resume and
DDP sharding of loader.py serve both. A planned scene is one positioned read of its record (its
payload checksum verified again: the file may have changed since it was indexed), a parse of its
Example, and the decode of only the views the plan asks for, through the converter's decode and
exact area resize: the pixels are those `gqn-fast data convert-deepmind` writes, bit for bit.
"""

from __future__ import annotations

import operator
import os
import struct
from pathlib import Path

import numpy as np
import torch

from gqn_fast.data.catalog import DeepMindDataset
from gqn_fast.data.deepmind import decode_frames_into, scene_features
from gqn_fast.data.format import IMAGE_SIZE
from gqn_fast.data.loader import Batch, BatchArrays, BatchPlan, batch_from_arrays
from gqn_fast.data.record_index import open_index
from gqn_fast.data.tfrecord import CorruptRecordError, masked_crc32c


class RecordDataset:
    """The scenes of one split folder of DeepMind's download (its DeepMind-named TFRecords).

    Opening indexes the split on first use (record_index.py; `skip_corrupt` leaves damaged
    records out). Attributes: num_scenes (= len), num_views (T), info (the DeepMind set),
    manifest (what a converted split's manifest would say: name, split, num_scenes, num_views,
    image_size, source, deepmind). Files are opened in each process on first read, never pickled.
    """

    worker_processes = True  # decoding holds the GIL: the loader's workers are processes

    def __init__(
        self, folder, info: DeepMindDataset, split: str, skip_corrupt: bool = False, cache_dir=None, progress=True
    ):
        self.split_dir, self.info, self.split = Path(folder), info, split
        self.index = open_index(self.split_dir, info, split, skip_corrupt, cache_dir=cache_dir, progress=progress)
        self.num_scenes, self.num_views = len(self.index.offset), info.num_views
        self.manifest = {
            "name": info.name,
            "split": split,
            "num_scenes": self.num_scenes,
            "num_views": self.num_views,
            "image_size": IMAGE_SIZE,
            "source": f"DeepMind gqn-datasets {info.name}, read from its TFRecords in {self.split_dir}",
            "deepmind": {"dataset": info.name, "frame_size": info.image_size, "skipped_records": self.index.skipped},
        }
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            if getattr(self, "_pid", None) == os.getpid():
                os.close(fd)

    def __len__(self) -> int:
        return self.num_scenes

    def _fd(self, file: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._files, self._pid = {}, os.getpid()
        if file not in self._files:
            self._files[file] = os.open(self.split_dir / self.index.files[file], os.O_RDONLY)
        return self._files[file]

    def _where(self, scene: int) -> tuple[Path, int]:
        """The file and record index of a scene, for messages."""
        return self.split_dir / self.index.files[self.index.file[scene]], int(self.index.record[scene])

    def features(self, scene: int) -> tuple[list[bytes], np.ndarray]:
        """Scene `scene`'s (frames: T JPEG strings, cameras float32 [T, 5]); CorruptRecordError
        naming the file and record if it no longer reads as it did when indexed."""
        file, offset, length = int(self.index.file[scene]), int(self.index.offset[scene]), int(self.index.length[scene])
        raw = os.pread(self._fd(file), length + 4, offset)
        payload = raw[:length]
        try:
            if len(raw) != length + 4 or masked_crc32c(payload) != struct.unpack("<I", raw[length:])[0]:
                raise ValueError("the file changed since it was indexed (its record no longer matches its checksum)")
            return scene_features(payload, self.info)
        except ValueError as error:
            raise CorruptRecordError(*self._where(scene), str(error)) from None

    def _decode_into(self, scene: int, frames: list[bytes], views, out) -> None:
        try:
            decode_frames_into(frames, self.info, views, out)
        except ValueError as error:
            raise CorruptRecordError(*self._where(scene), str(error)) from None

    def scene_views(self, scene: int, views) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [len(views), 64, 64, 3], cameras float32 [len(views), 5]) of a scene."""
        frames, cameras = self.features(scene)
        images = np.empty((len(views), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self._decode_into(scene, frames, views, images)
        return images, cameras[views]

    def scene(self, index) -> tuple[np.ndarray, np.ndarray]:
        """All T views of a scene: (images uint8 [T, 64, 64, 3], cameras float32 [T, 5])."""
        i = operator.index(index)
        if not -self.num_scenes <= i < self.num_scenes:
            raise IndexError(f"index: {i} out of range for {self.num_scenes} scenes")
        return self.scene_views(i % self.num_scenes, np.arange(self.num_views))

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        images, cameras = self.scene(index)
        return torch.from_numpy(images), torch.from_numpy(cameras)

    def gather_arrays(self, plan: BatchPlan, out: BatchArrays | None = None) -> BatchArrays:
        """The plan's arrays, each view decoded straight into its row; into `out` when given
        (arrays of the plan's shapes: a worker's slot of memory shared with the training loop)."""
        scenes, views = np.asarray(plan.scenes), np.asarray(plan.views)
        b, m = len(scenes), views.shape[1] - 1
        if out is None:
            out = BatchArrays(
                np.empty((b, m, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                np.empty((b, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                np.empty((b, m + 1, 5), np.float32),
            )
        for row, (scene, chosen) in enumerate(zip(scenes, views)):
            frames, scene_cameras = self.features(int(scene))
            self._decode_into(
                int(scene), frames, chosen, [*out.context[row], out.query[row]]
            )  # straight into the batch
            out.cameras[row] = scene_cameras[chosen]
        return out

    def gather(self, plan: BatchPlan) -> Batch:
        """The batch a plan describes."""
        return batch_from_arrays(self.gather_arrays(plan))


class DecodedScenes:
    """A RecordDataset's images ([N, T, 64, 64, 3]) or cameras ([N, T, 5]) as an array indexed by
    scene, decoded on access: what eval, sample and analyze read from a converted split's memory map."""

    TAILS = {"images": (IMAGE_SIZE, IMAGE_SIZE, 3), "cameras": (5,)}

    def __init__(self, dataset: RecordDataset, part: str):
        if part not in self.TAILS:
            raise ValueError(f"part: expected one of {list(self.TAILS)}, got {part!r}")
        self.dataset, self.part = dataset, part
        self.shape = (dataset.num_scenes, dataset.num_views, *self.TAILS[part])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        images, cameras = self.dataset.scene(index)
        return images if self.part == "images" else cameras
