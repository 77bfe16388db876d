"""The training loader: batch contents, M and query rules, determinism, resume, distribution."""

import numpy as np
import pytest
import torch
from gqn_fast.reference.viewpoint import transform_viewpoint
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data.distributed import DistributedSampler

from gqn_fast.data import BatchPlanner, SceneDataset, make_dataset, make_loader, to_model_inputs
from gqn_fast.data.loader import SceneLoader


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 29 train scenes: batches of 4 leave a remainder, and 29 does not split evenly in 2 or 3.
    return make_dataset(tmp_path_factory.mktemp("data") / "sm", "shepard_metzler", 32, seed=1, progress=False)


def as_arrays(batches):
    return [[t.clone() for t in b] for b in batches]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert s.shape == t.shape and torch.equal(s, t)


def test_batches_hold_the_scenes_they_say(root):
    ds = SceneDataset(root, "train")
    images = torch.from_numpy(np.load(root / "train" / "images.npy"))
    cameras = torch.from_numpy(np.load(root / "train" / "cameras.npy"))
    loader = make_loader(root, "train", 4, 6, seed=3)
    for plan in loader.planner.plans():
        batch = ds.gather(plan)
        m = plan.views.shape[1] - 1
        cx, cv, qx, qv = batch
        assert cx.shape == (4, m, 3, 64, 64) and cx.dtype == torch.uint8
        assert cv.shape == (4, m, 7) and cv.dtype == torch.float32
        assert qx.shape == (4, 3, 64, 64) and qx.dtype == torch.uint8
        assert qv.shape == (4, 7) and qv.dtype == torch.float32
        for i, scene in enumerate(plan.scenes):
            ctx, query = plan.views[i, :m], plan.views[i, m]
            assert query not in ctx and len(set(ctx.tolist())) == m
            assert torch.equal(cx[i], images[scene, ctx].permute(0, 3, 1, 2))
            assert torch.equal(qx[i], images[scene, query].permute(2, 0, 1))
            assert torch.equal(cv[i], transform_viewpoint(cameras[scene, ctx]))
            assert torch.equal(qv[i], transform_viewpoint(cameras[scene, query]))


def test_m_is_uniform_in_1_to_k_and_scenes_cover_the_epoch(root):
    planner = BatchPlanner(num_scenes=29, num_views=15, batch_size=4, max_context=5, seed=0, drop_last=True)
    ms = []
    for epoch in range(60):
        planner.set_epoch(epoch)
        plans = list(planner.plans())
        assert len(plans) == 7  # 29 // 4
        scenes = np.concatenate([p.scenes for p in plans])
        assert len(set(scenes.tolist())) == 28  # no scene twice in an epoch
        ms += [p.views.shape[1] - 1 for p in plans]
    counts = np.bincount(ms, minlength=6)[1:]
    assert counts.min() > 0.6 * len(ms) / 5 and counts.max() < 1.4 * len(ms) / 5
    planner = BatchPlanner(29, 15, 4, 5, seed=0, drop_last=False)
    plans = list(planner.plans())
    assert len(plans) == 8 and len(plans[-1].scenes) == 1
    assert sorted(np.concatenate([p.scenes for p in plans]).tolist()) == list(range(29))


@given(views=st.integers(2, 20), k=st.integers(1, 19), seed=st.integers(0, 2**31), batch=st.integers(0, 10**6))
def test_query_is_never_a_context_view(views, k, seed, batch):
    k = min(k, views - 1)
    planner = BatchPlanner(50, views, 8, k, seed)
    plan = planner.plan(batch, np.arange(8))
    m = plan.views.shape[1] - 1
    assert 1 <= m <= k
    for row in plan.views:
        assert len(set(row.tolist())) == m + 1 and row.min() >= 0 and row.max() < views


def test_same_seed_same_batches_any_workers_and_new_epochs_differ(root):
    def epoch(seed, workers, e):
        loader = make_loader(root, "train", 4, 9, seed=seed, num_workers=workers)
        loader.set_epoch(e)
        return as_arrays(loader)

    def plans(seed, e):
        planner = make_loader(root, "train", 4, 9, seed=seed).planner
        planner.set_epoch(e)
        return [(p.scenes.tolist(), p.views.tolist()) for p in planner.plans()]

    base = epoch(7, 0, 0)
    assert_same_batches(base, epoch(7, 0, 0))
    assert_same_batches(base, epoch(7, 2, 0))
    assert_same_batches(base, epoch(7, 3, 0))
    assert plans(7, 0) == plans(7, 0)
    assert plans(7, 0) != plans(7, 1)
    assert plans(7, 0) != plans(8, 0)


def test_a_memory_mapped_split_gathered_in_worker_processes_gives_the_same_batches(root):
    # Threads serve a converted split; processes (writing into shared slots) must give the same.
    dataset = SceneDataset(root, "train")
    expected = list(make_loader(dataset, "train", 4, 9, seed=3, drop_last=False, pin_memory=False))
    planner = BatchPlanner(dataset.num_scenes, dataset.num_views, 4, 9, seed=3, drop_last=False)
    loader = SceneLoader(dataset, planner, num_workers=2, prefetch_factor=1, processes=True)
    assert_same_batches(expected, list(loader))  # 8 batches through 2 slots, the last of 1 scene
    loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(root, workers):
    loader = make_loader(root, "train", 4, 9, seed=11, num_workers=workers)
    loader.set_epoch(2)
    full = as_arrays(loader)
    assert len(full) == len(loader) == 7

    # Run 3 batches, checkpoint, "crash".
    loader = make_loader(root, "train", 4, 9, seed=11, num_workers=workers)
    loader.set_epoch(2)
    seen = []
    for batch in loader:
        seen.append([t.clone() for t in batch])
        if len(seen) == 3:
            state = loader.state_dict()
            break
    assert state["epoch"] == 2 and state["batch"] == 3

    resumed = make_loader(root, "train", 4, 9, seed=11, num_workers=workers)
    resumed.load_state_dict(state)
    assert_same_batches(seen + as_arrays(resumed), full)
    # After the epoch the next one starts from its beginning.
    assert resumed.state_dict()["batch"] == 7
    resumed.set_epoch(3)
    assert len(as_arrays(resumed)) == 7

    with pytest.raises(ValueError, match="seed"):
        make_loader(root, "train", 4, 9, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="start_batch"):
        resumed.set_epoch(0, start_batch=8)


def test_distributed_ranks_split_the_scenes_like_distributed_sampler(root):
    world = 3
    loaders = [
        make_loader(root, "train", 2, 4, seed=5, distributed=True, rank=r, world_size=world, drop_last=False)
        for r in range(world)
    ]
    scenes_by_rank, ms_by_rank = [], []
    for r, loader in enumerate(loaders):
        loader.set_epoch(4)
        plans = list(loader.planner.plans())
        scenes_by_rank.append(np.concatenate([p.scenes for p in plans]).tolist())
        ms_by_rank.append([p.views.shape[1] - 1 for p in plans])
        sampler = DistributedSampler(range(29), num_replicas=world, rank=r, shuffle=True, seed=5)
        sampler.set_epoch(4)
        assert scenes_by_rank[-1] == list(sampler)
    assert sorted(set(sum(scenes_by_rank, []))) == list(range(29))  # every scene, by some rank
    assert ms_by_rank[0] == ms_by_rank[1] == ms_by_rank[2]  # same M per step: no rank waits
    with pytest.raises(ValueError, match="torch.distributed"):
        make_loader(root, "train", 2, 4, seed=5, distributed=True)


def test_to_model_inputs_converts_on_the_device(root):
    batch = next(iter(make_loader(root, "train", 4, 3, seed=0)))
    cx, cv, qx, qv = to_model_inputs(batch, "cpu")
    assert cx.is_contiguous() and qx.is_contiguous()
    assert cx.dtype == qx.dtype == cv.dtype == qv.dtype == torch.float32
    assert torch.equal(cx, batch.context_x.float() / 255) and torch.equal(qx, batch.query_x.float() / 255)
    assert float(cx.min()) >= 0 and float(cx.max()) <= 1
    assert torch.equal(cv, batch.context_v)
    half = to_model_inputs(batch, torch.device("cpu"), dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in half)
    with pytest.raises(TypeError, match="context_x"):
        to_model_inputs((cx, cv, qx, qv), "cpu")


def test_loader_checks_its_arguments(root):
    with pytest.raises(ValueError, match="max_context: at most T - 1 = 14"):
        make_loader(root, "train", 4, 15, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(root, "train", 0, 3, seed=0)
    with pytest.raises(ValueError, match="batch_size: 30"):
        make_loader(root, "train", 30, 3, seed=0)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(root, "train", 4, 3, seed=0, num_workers=-1)


def test_loader_takes_an_opened_dataset(root):
    dataset = SceneDataset(root, "train")
    given = make_loader(dataset, "train", 4, 3, seed=2)
    assert given.dataset is dataset
    assert_same_batches(as_arrays(given), as_arrays(make_loader(root, "train", 4, 3, seed=2)))
    with pytest.raises(ValueError, match="split: 'test', but the dataset given as root is of split 'train'"):
        make_loader(dataset, "test", 4, 3, seed=2)
