"""Feeding a GQN: a memory-mapped scene Dataset, batch plans and the training loader.

A batch is planned in the calling thread (which scenes, M, which views) and gathered by a
worker thread with one fancy-indexing read per array from the memory-mapped split. The plan
depends only on (seed, epoch, batch index, rank), so batches are the same whatever the
number of workers, and resuming at batch k of epoch e gives the batches an uninterrupted
run would have given.

Images stay uint8 and channels-last ([..., 64, 64, 3], as on disk) on the host: the batch's
[B, M, 3, 64, 64] image tensors are permuted *views* of that memory, because transposing on
the CPU costs more than the whole gather. `to_model_inputs` sends the uint8 to the device and
converts and lays them out there in one pass.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from gqn_fast.data.format import CAMERAS, IMAGE_SIZE, IMAGES, SPLITS, open_split
from gqn_fast.data.workers import process_context, worker_init
from gqn_fast.reference.viewpoint import transform_viewpoint


class Batch(NamedTuple):
    """One training batch; unpacks as (context_x, context_v, query_x, query_v).

    context_x: uint8 [B, M, 3, 64, 64], a view with channels-last strides (`.contiguous()`
    if you need standard strides); context_v: float32 [B, M, 7] (x, y, z, cos yaw, sin yaw,
    cos pitch, sin pitch); query_x: uint8 [B, 3, 64, 64], the same kind of view;
    query_v: float32 [B, 7].
    """

    context_x: torch.Tensor
    context_v: torch.Tensor
    query_x: torch.Tensor
    query_v: torch.Tensor


class BatchArrays(NamedTuple):
    """A batch as the dataset reads it: context uint8 [B, M, 64, 64, 3], query uint8 [B, 64, 64, 3],
    cameras float32 [B, M + 1, 5] (the context's, then the query's)."""

    context: np.ndarray
    query: np.ndarray
    cameras: np.ndarray


def batch_from_arrays(arrays: BatchArrays) -> Batch:
    """The Batch of a dataset's arrays: images as channels-first views, cameras as viewpoints."""
    m = arrays.context.shape[1]
    v = transform_viewpoint(torch.from_numpy(arrays.cameras))
    return Batch(
        torch.from_numpy(arrays.context).permute(0, 1, 4, 2, 3),
        v[:, :m].contiguous(),
        torch.from_numpy(arrays.query).permute(0, 3, 1, 2),
        v[:, m].contiguous(),
    )


def batch_copied_from(arrays: BatchArrays) -> Batch:
    """The Batch of arrays that will be written over (a shared slot), copied out with numpy: one
    thread, where torch's copy would wake its thread pool beside the workers."""
    return batch_from_arrays(BatchArrays(*(a.copy() for a in arrays)))


class BatchPlan(NamedTuple):
    """Scenes [B] of a batch and, per scene, the views [B, M + 1]: M context views, then the query."""

    scenes: np.ndarray
    views: np.ndarray


class SceneDataset(Dataset):
    """The scenes of one split of a dataset folder, memory-mapped.

    `ds[i]` -> (images uint8 [T, 64, 64, 3], as stored on disk; cameras float32 [T, 5] as
    (x, y, z, yaw, pitch)). Attributes: num_scenes (= len), num_views (T), manifest.
    Opening checks the files (DatasetFormatError names the file and the problem). The
    memory maps are reopened in each worker process rather than pickled.
    """

    worker_processes = False  # a gather is a numpy read that releases the GIL: threads suffice

    def __init__(self, root, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder")
        self.split_dir = self.root / split
        images, cameras, self.manifest = open_split(self.split_dir)
        self.num_scenes, self.num_views = int(images.shape[0]), int(images.shape[1])
        self._images, self._cameras = images, cameras

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = state["_cameras"] = None
        return state

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, cameras): the memory maps, [N, T, 64, 64, 3] uint8 and [N, T, 5] float32."""
        if self._images is None:
            self._images = np.load(self.split_dir / IMAGES, mmap_mode="r")
            self._cameras = np.load(self.split_dir / CAMERAS, mmap_mode="r")
        return self._images, self._cameras

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        i = operator.index(index)
        if not -self.num_scenes <= i < self.num_scenes:
            raise IndexError(f"index: {i} out of range for {self.num_scenes} scenes")
        images, cameras = self.arrays()
        return torch.from_numpy(np.array(images[i])), torch.from_numpy(np.array(cameras[i]))

    def gather_arrays(self, plan: BatchPlan, out: BatchArrays | None = None) -> BatchArrays:
        """The plan's arrays; written into `out` when given (arrays of the plan's shapes)."""
        images, cameras = self.arrays()
        scenes, views = np.asarray(plan.scenes), np.asarray(plan.views)
        m = views.shape[1] - 1
        arrays = BatchArrays(
            np.asarray(images[scenes[:, None], views[:, :m]]),
            np.asarray(images[scenes, views[:, m]]),
            np.asarray(cameras[scenes[:, None], views]),
        )
        if out is None:
            return arrays
        for dest, source in zip(out, arrays):
            dest[...] = source
        return out

    def gather(self, plan: BatchPlan) -> Batch:
        """The batch a plan describes."""
        return batch_from_arrays(self.gather_arrays(plan))


class BatchPlanner:
    """The batches of an epoch for one rank, as plans.

    Scene order: torch's DistributedSampler (num_replicas=1 when not distributed), seeded with
    `seed` and the epoch. Batch k of epoch e: M from a generator keyed (seed, e, k), the same on
    every rank so no rank waits for a bigger one; the views from one keyed (seed, e, k, rank):
    per scene a random permutation of the T views, the first M the context, the next the query.
    """

    def __init__(
        self,
        num_scenes: int,
        num_views: int,
        batch_size: int,
        max_context: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        for name, value, low in (("batch_size", batch_size, 1), ("max_context", max_context, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if max_context > num_views - 1:
            raise ValueError(f"max_context: at most T - 1 = {num_views - 1} (one view is the query), got {max_context}")
        self.num_views, self.batch_size, self.max_context, self.seed = num_views, batch_size, max_context, seed
        self.drop_last, self.rank, self.num_replicas = drop_last, rank, num_replicas
        self.scene_sampler = DistributedSampler(
            range(num_scenes), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"batch_size: {batch_size} is more than the {len(self.scene_sampler)} scenes of this rank "
                f"(drop_last=True leaves no batch)"
            )

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        self.epoch = epoch
        self.scene_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.scene_sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def plan(self, batch: int, scenes: np.ndarray) -> BatchPlan:
        m = int(np.random.default_rng([self.seed, self.epoch, batch, 0]).integers(1, self.max_context + 1))
        rng = np.random.default_rng([self.seed, self.epoch, batch, 1, self.rank])
        views = np.argsort(rng.random((len(scenes), self.num_views)), axis=1)[:, : m + 1]
        return BatchPlan(scenes, views)

    def plans(self, start: int = 0) -> Iterator[BatchPlan]:
        """The epoch's plans from batch `start` on."""
        order = np.fromiter(iter(self.scene_sampler), dtype=np.int64)
        b = self.batch_size
        for k in range(start, len(self)):
            yield self.plan(k, order[k * b : (k + 1) * b])


class SceneLoader:
    """An iterable of Batch for one epoch at a time, like a DataLoader with a DistributedSampler.

    set_epoch(e, start_batch=0) picks the epoch (and where in it the next pass starts);
    state_dict() -> {"epoch", "batch", ...} where batch counts the batches handed out in
    the current epoch, so take it after the step that used the last one;
    load_state_dict(state) resumes there: the next pass yields exactly the remaining batches
    of that epoch that an uninterrupted run would have.

    Workers are threads unless `processes`: a memory-mapped gather is one memcpy-bound numpy
    read that releases the GIL (under 1 ms for the paper's batch), while a process worker would
    pay several times that to hand 4 MB to this process for every batch. Decoding JPEGs
    (records.RecordDataset) is Python and holds the GIL: there processes, each decoding whole
    batches straight into a slot of memory shared with this process (SharedBatches, where
    workers fork), which copies the batch out once (into pinned memory with pin_memory): no
    pickling and no pipe. Workers start with the first pass and serve the next epochs; an
    error, a Ctrl-C, a pass left early or close() stops them.
    """

    def __init__(
        self,
        dataset: SceneDataset,
        planner: BatchPlanner,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        processes: bool = False,
    ):
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers: expected a non-negative int, got {num_workers!r}")
        if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ValueError(f"prefetch_factor: expected a positive int, got {prefetch_factor!r}")
        self.dataset, self.planner = dataset, planner
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.processes = processes
        self._workers = self._shared = None
        self._start = self._position = 0

    @property
    def epoch(self) -> int:
        return self.planner.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.planner.set_epoch(epoch)
        if not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: expected an int in [0, {len(self)}], got {start_batch!r}")
        self._start = self._position = start_batch

    def __len__(self) -> int:
        """Batches in a whole epoch (for this rank)."""
        return len(self.planner)

    def _pinned(self, batch: Batch) -> Batch:
        if self.pin_memory:
            batch = Batch(*(t.pin_memory() for t in batch))  # keeps the channels-last strides
        return batch

    def _fetch(self, plan: BatchPlan) -> Batch:
        return self._pinned(self.dataset.gather(plan))

    def _pool(self):
        """The workers: started on the first pass, kept for the next epochs."""
        if self._workers is None:
            if self.processes:
                context = process_context()
                if context.get_start_method() == "fork":  # the map is inherited, not pickled
                    slots = self.num_workers * self.prefetch_factor
                    self._shared = SharedBatches(slots, self.planner.batch_size, self.planner.max_context + 1)
                self._workers = ProcessPoolExecutor(
                    self.num_workers,
                    mp_context=context,
                    initializer=_start_worker,
                    initargs=(self.dataset, self._shared, os.getpid()),
                )
            else:
                self._workers = ThreadPoolExecutor(self.num_workers, thread_name_prefix="gqn-loader")
        return self._workers

    def _submit(self, plan: BatchPlan, k: int):
        """Batch k of this pass started in a worker: a future of what `_receive` makes a Batch of.
        At most slots batches are in flight and they come back in order: batch k's slot is free."""
        pool = self._pool()
        if not self.processes:
            return pool.submit(self._fetch, plan)
        return pool.submit(_gather_in_worker, plan, None if self._shared is None else k % self._shared.slots)

    def _receive(self, future, plan: BatchPlan, k: int) -> Batch:
        """The Batch of `_submit(plan, k)`'s future."""
        result = future.result()
        if not self.processes:
            return result
        if self._shared is None:  # the arrays came through the pipe
            return self._pinned(batch_from_arrays(result))
        arrays = self._shared.arrays(k % self._shared.slots, *np.shape(plan.views))
        if self.pin_memory:  # the copy into pinned memory is the one copy out of the slot
            return self._pinned(batch_from_arrays(arrays))
        return batch_copied_from(arrays)

    def close(self) -> None:
        """Stop the workers (a later pass starts new ones)."""
        if self._workers is not None:
            self._workers.shutdown(wait=True, cancel_futures=True)
            self._workers = self._shared = None

    def __del__(self):
        if getattr(self, "_workers", None) is not None:  # also when __init__ stopped early
            self.close()

    def _batches(self, plans) -> Iterator[Batch]:
        if self.num_workers == 0:
            yield from map(self._fetch, plans)
            return
        pending: deque = deque()
        finished = False
        try:
            for k, plan in enumerate(plans):
                pending.append((self._submit(plan, k), plan, k))
                if len(pending) >= self.num_workers * self.prefetch_factor:
                    yield self._receive(*pending.popleft())
            while pending:
                yield self._receive(*pending.popleft())
            finished = True
        finally:
            if not finished:  # an error, a Ctrl-C or a pass left early: no worker keeps on for it
                self.close()

    def __iter__(self) -> Iterator[Batch]:
        self._position = self._start
        for batch in self._batches(self.planner.plans(self._start)):
            self._position += 1
            yield batch
        self._start = 0  # a finished epoch starts from its beginning if iterated again

    def state_dict(self) -> dict:
        p = self.planner
        return {
            "epoch": p.epoch,
            "batch": self._position,
            "seed": p.seed,
            "batch_size": p.batch_size,
            "max_context": p.max_context,
            "num_scenes": self.dataset.num_scenes,
            "rank": p.rank,
            "num_replicas": p.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "max_context", "num_scenes", "rank", "num_replicas"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"state: {key} = {state.get(key)!r} but this loader has {mine[key]!r}; "
                    "the batches would not be the ones of the interrupted run"
                )
        self.set_epoch(state["epoch"], start_batch=state["batch"])


IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
IMAGE_BYTES, CAMERA_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3, 5 * 4


class SharedBatches:
    """`slots` buffers, each the size of the largest batch (batch_size scenes of max_views views:
    M + 1), in an anonymous shared map that worker processes forked after it is made write into
    and this process reads (not /dev/shm, which containers keep small)."""

    def __init__(self, slots: int, batch_size: int, max_views: int):
        self.slots = slots
        self.slot_bytes = batch_size * max_views * (IMAGE_BYTES + CAMERA_BYTES)
        self._memory = mmap.mmap(-1, slots * self.slot_bytes)

    def arrays(self, slot: int, scenes: int, views: int) -> BatchArrays:
        """Slot `slot` as the arrays of a batch of `scenes` scenes of `views` views each (M + 1):
        contiguous from the slot's start, writable."""
        context, query = scenes * (views - 1) * IMAGE_BYTES, scenes * IMAGE_BYTES
        at = slot * self.slot_bytes
        return BatchArrays(
            np.frombuffer(self._memory, np.uint8, context, at).reshape(scenes, views - 1, *IMAGE_SHAPE),
            np.frombuffer(self._memory, np.uint8, query, at + context).reshape(scenes, *IMAGE_SHAPE),
            np.frombuffer(self._memory, np.float32, scenes * views * 5, at + context + query).reshape(scenes, views, 5),
        )


# A worker process's dataset and shared slots: set once when it starts (inherited, not
# pickled, where it forks).
_worker_dataset = _worker_shared = None


def _start_worker(dataset, shared: SharedBatches | None, parent: int) -> None:
    from threadpoolctl import threadpool_limits

    global _worker_dataset, _worker_shared
    _worker_dataset, _worker_shared = dataset, shared
    worker_init(parent)  # Ctrl-C goes to the parent, which stops the pool; exits with the parent
    threadpool_limits(limits=1, user_api="blas")  # one core each: the resize's products gain nothing from more


def _gather_in_worker(plan: BatchPlan, slot: int | None) -> BatchArrays | None:
    """The plan's batch written into shared slot `slot` (None returned), or returned where
    there are no shared slots."""
    if slot is None:
        return _worker_dataset.gather_arrays(plan)
    _worker_dataset.gather_arrays(plan, out=_worker_shared.arrays(slot, *np.shape(plan.views)))
    return None


def make_loader(
    root,
    split,
    batch_size,
    max_context,
    seed,
    num_workers=0,
    distributed=False,
    shuffle=True,
    drop_last=True,
    *,
    rank=None,
    world_size=None,
    pin_memory=None,
    prefetch_factor=4,
) -> SceneLoader:
    """A SceneLoader over split `split` of the dataset folder `root`.

    Batches of `batch_size` scenes with M uniform in 1..max_context (the same M for the whole
    batch; max_context <= T - 1) and a query view that is never a context view.
    distributed=True takes rank and world size from torch.distributed (or `rank` / `world_size`).
    num_workers: gathering threads (0: in the calling thread); pin_memory defaults to whether
    CUDA is available. Call `set_epoch(e)` before each epoch, as with a DistributedSampler.
    `root` may also be a dataset of split `split` already opened (a SceneDataset, or a
    records.RecordDataset, which gathers in worker processes).
    """
    if not isinstance(root, (str, os.PathLike)):  # a SceneDataset or records.RecordDataset
        if root.split != split:
            raise ValueError(f"split: {split!r}, but the dataset given as root is of split {root.split!r}")
        dataset = root
    else:
        dataset = SceneDataset(root, split)
    if distributed:
        if rank is None or world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise ValueError(
                    "distributed: torch.distributed is not initialised; init it or pass rank and world_size"
                )
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
    else:
        rank, world_size = 0, 1
    planner = BatchPlanner(
        dataset.num_scenes,
        dataset.num_views,
        batch_size,
        max_context,
        seed,
        shuffle=shuffle,
        drop_last=drop_last,
        num_replicas=world_size,
        rank=rank,
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return SceneLoader(
        dataset,
        planner,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        processes=dataset.worker_processes,
    )


def to_model_inputs(batch, device, dtype=torch.float32, out=None):
    """(context_x, context_v, query_x, query_v) on `device`: images float in [0, 1] and
    contiguous [B, M, 3, 64, 64] / [B, 3, 64, 64], viewpoints [B, M, 7] / [B, 7], all `dtype`;
    written into `out` when given (four such tensors, e.g. a CUDA graph's static inputs).

    The images cross to the device as uint8 (non-blocking from pinned memory) and are
    converted there, in one pass that also lays them out."""
    context_x, context_v, query_x, query_v = batch
    for name, x in (("context_x", context_x), ("query_x", query_x)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            raise TypeError(f"{name}: expected a uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    device = torch.device(device)
    if out is None:
        out = tuple(torch.empty(t.shape, dtype=dtype, device=device) for t in batch)  # contiguous
    for buffer, value, is_image in zip(out, batch, (True, False, True, False)):
        buffer.copy_(value.to(device, non_blocking=True))
        if is_image:
            buffer.div_(255)
    return tuple(out)
