"""Training on DeepMind's download as it is: the record index and the dataset that reads records.

The TFRecord files are written by tests/deepmind_files.py under DeepMind's names; the
converter (`convert_deepmind`) on the same files is the oracle of every pixel.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from deepmind_files import example, frame_record, jpeg, smooth_images, write_dataset

import gqn_fast.data.loader as loader_module
from gqn_fast.checkpoint import load_checkpoint
from gqn_fast.cli import main
from gqn_fast.data import CorruptRecordError, DatasetFormatError, SceneDataset, make_loader
from gqn_fast.data.deepmind import DEEPMIND_DATASETS, convert_deepmind
from gqn_fast.data.folder import CONVERTED, DOWNLOAD, inspect_folder, open_dataset
from gqn_fast.data.loader import BatchPlanner
from gqn_fast.data.record_index import index_path
from gqn_fast.data.records import RecordDataset
from gqn_fast.data.tfrecord import scan_frames
from gqn_fast.errors import UsageError

pytest.importorskip("google_crc32c")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every index of a test in its own cache folder."""
    monkeypatch.setenv("GQN_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def listing(folder):
    """Every file under a folder with its size and mtime: what must not change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def flip_payload_byte(path, record):
    """Damage record `record`'s payload: its data checksum fails, its framing holds."""
    frame = [f for f in scan_frames(path) if f.index == record][0]
    with open(path, "rb+") as f:
        f.seek(frame.offset + frame.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def record_dataset(src, name, split="train", **options):
    return RecordDataset(src / name / split, DEEPMIND_DATASETS[name], split, progress=False, **options)


def assert_same_batch(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y)


@pytest.mark.parametrize(
    "name, files",
    [
        ("rooms_ring_camera", [3, 2]),  # 64 px, T = 10
        ("jaco", [4]),  # 64 px, T = 11
        ("rooms_free_camera_with_object_rotations", [2, 1]),  # 128 px, T = 10
        ("mazes", [2]),  # 84 px, T = 300
    ],
)
def test_batches_from_the_download_are_the_converted_batches(tmp_path, name, files):
    src = tmp_path / "src"
    write_dataset(src, name, "train", files, seed=len(name))
    convert_deepmind(src, tmp_path / "out", name, splits=("train",), workers=1, progress=False)
    converted, download = SceneDataset(tmp_path / "out", "train"), record_dataset(src, name)
    assert (download.num_scenes, download.num_views) == (converted.num_scenes, converted.num_views)
    for max_context in sorted({1, converted.num_views - 1}):
        planner = BatchPlanner(converted.num_scenes, converted.num_views, 2, max_context, seed=7)
        for epoch in range(2):
            planner.set_epoch(epoch)
            for plan in planner.plans():
                assert_same_batch(download.gather(plan), converted.gather(plan))
    images, cameras = download[converted.num_scenes - 1]
    assert torch.equal(images, converted[-1][0]) and torch.equal(cameras, converted[-1][1])


def test_workers_give_the_same_batches_and_resume_exactly(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, "shepard_metzler_7_parts", "train", [5, 6], seed=3)
    download = record_dataset(src, "shepard_metzler_7_parts")
    runs = {}
    for workers in (0, 1, 2):
        loader = make_loader(download, "train", 3, 5, seed=4, num_workers=workers, pin_memory=False)
        assert loader.processes
        loader.set_epoch(1)
        runs[workers] = list(loader)  # each batch its own memory: intact after the later ones
    for workers in (1, 2):
        for a, b in zip(runs[0], runs[workers], strict=True):
            assert_same_batch(a, b)
    # Stopped after two batches of epoch 1, resumed by a new loader in a new process's place.
    loader = make_loader(download, "train", 3, 5, seed=4, num_workers=2, pin_memory=False)
    loader.set_epoch(1)
    seen = iter(loader)
    next(seen), next(seen)
    state = loader.state_dict()
    del seen
    resumed = make_loader(record_dataset(src, "shepard_metzler_7_parts"), "train", 3, 5, seed=4, num_workers=2)
    resumed.load_state_dict(state)
    for a, b in zip(runs[0][2:], resumed, strict=True):
        assert_same_batch(a, b)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_worker_batches_through_shared_slots_or_the_pipe_are_the_same(tmp_path, monkeypatch, start_method):
    # Forked workers write into shared slots (two here, reused by every other batch); spawned
    # ones send the arrays. A smaller last batch (drop_last=False) and every M come back whole.
    monkeypatch.setattr(loader_module, "process_context", lambda: multiprocessing.get_context(start_method))
    src = tmp_path / "src"
    write_dataset(src, "shepard_metzler_7_parts", "train", [11], seed=5)
    download = record_dataset(src, "shepard_metzler_7_parts")
    expected = list(make_loader(download, "train", 3, 9, seed=2, drop_last=False, pin_memory=False))
    assert len(expected[-1].query_x) == 2
    options = {"num_workers": 2, "prefetch_factor": 1, "drop_last": False, "pin_memory": False}
    loader = make_loader(download, "train", 3, 9, seed=2, **options)
    batches = []
    for batch in loader:
        assert (loader._shared is not None) == (start_method == "fork")
        batches.append(batch)
    for a, b in zip(expected, batches, strict=True):
        assert_same_batch(a, b)
    loader.close()


@pytest.mark.cuda
def test_cuda_pinned_batches_are_copied_out_of_the_shared_slots(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, "shepard_metzler_7_parts", "train", [11], seed=6)
    download = record_dataset(src, "shepard_metzler_7_parts")
    expected = list(make_loader(download, "train", 3, 9, seed=2, pin_memory=False))
    loader = make_loader(download, "train", 3, 9, seed=2, num_workers=2, prefetch_factor=1, pin_memory=True)
    batches = list(loader)
    for a, b in zip(expected, batches, strict=True):
        assert all(t.is_pinned() for t in b)
        assert_same_batch(a, b)


def test_a_damaged_jpeg_is_named_from_a_worker_and_the_workers_end(tmp_path):
    src = tmp_path / "src"
    folder = src / "rooms_ring_camera" / "train"
    folder.mkdir(parents=True)
    good = [jpeg(x) for x in smooth_images(np.random.default_rng(0), 10, 64)]
    records = [example({"frames": good, "cameras": np.zeros(50, np.float32)})] * 3
    records.append(example({"frames": good[:9] + [b"not a jpeg"], "cameras": np.zeros(50, np.float32)}))
    (folder / "0001-of-2160.tfrecord").write_bytes(b"".join(frame_record(r) for r in records))
    download = record_dataset(src, "rooms_ring_camera")  # the index checks features, not JPEGs
    loader = make_loader(download, "train", 4, 9, seed=0, num_workers=2, pin_memory=False)
    children = _children()
    with pytest.raises(CorruptRecordError, match=r"0001-of-2160.tfrecord: record 3: frame 9: not a decodable image"):
        list(loader)
    assert _children() == children  # the pool's processes ended with it


def _children():
    """This process's child processes (Linux), so a test can see a pool's workers are gone."""
    path = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    return set(open(path).read().split()) if os.path.exists(path) else set()


def test_the_index_is_made_once_in_the_cache_and_the_download_is_untouched(tmp_path, cache, capsys):
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [2, 3], seed=5)
    folder = src / "rooms_ring_camera" / "train"
    before = listing(src)
    first = record_dataset(src, "rooms_ring_camera")
    path = index_path(folder)
    assert path.is_file() and path.parent.parent == cache
    header_bytes = int.from_bytes(path.read_bytes()[8:16], "little")
    assert path.stat().st_size == 16 + header_bytes + 4 * 5  # four bytes a record
    made = path.stat().st_mtime_ns
    again = record_dataset(src, "rooms_ring_camera")
    assert path.stat().st_mtime_ns == made and np.array_equal(again.index.offset, first.index.offset)
    assert listing(src) == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    # A file added, one rewritten: indexed again, saying so.
    write_dataset(src / "more", "rooms_ring_camera", "train", [4], seed=6, numbers=[7])
    (src / "more" / "rooms_ring_camera" / "train" / "0007-of-2160.tfrecord").replace(folder / "0007-of-2160.tfrecord")
    capsys.readouterr()
    grown = record_dataset(src, "rooms_ring_camera")
    assert "its files changed since they were indexed (1 new); indexing again" in capsys.readouterr().err
    assert grown.num_scenes == 9
    # A damaged index file is the cache's own: made again.
    path.write_bytes(path.read_bytes()[:-3])
    assert record_dataset(src, "rooms_ring_camera").num_scenes == 9


def test_damaged_records_are_named_as_the_converter_names_them(tmp_path, capsys):
    src = tmp_path / "src"
    scenes = write_dataset(src, "rooms_ring_camera", "train", [3, 2, 2], seed=8, numbers=[1, 2, 4])
    folder = src / "rooms_ring_camera" / "train"
    flip_payload_byte(folder / "0001-of-2160.tfrecord", 1)
    (folder / "0003-of-2160.tfrecord").write_bytes(b"")  # a failed download
    partial = folder / "0004-of-2160.tfrecord"
    partial.write_bytes(partial.read_bytes()[:-100])  # a download cut short: its last record
    expected = f"{folder / '0001-of-2160.tfrecord'}: record 1: data checksum mismatch"
    with pytest.raises(CorruptRecordError) as caught:
        convert_deepmind(src, tmp_path / "stopped", "rooms_ring_camera", splits=("train",), progress=False)
    assert str(caught.value) == expected
    with pytest.raises(CorruptRecordError) as caught:
        record_dataset(src, "rooms_ring_camera")
    assert str(caught.value) == expected
    report = convert_deepmind(
        src, tmp_path / "out", "rooms_ring_camera", splits=("train",), skip_corrupt=True, progress=False
    )
    capsys.readouterr()
    download = record_dataset(src, "rooms_ring_camera", skip_corrupt=True)
    assert "skipped 3 damaged records" in capsys.readouterr().err
    assert sorted(map(tuple, download.index.skipped)) == sorted(map(tuple, report["train"]["skipped"]))
    converted = SceneDataset(tmp_path / "out", "train")
    assert download.num_scenes == converted.num_scenes == 5  # records 0, 2 of file 1; file 2; record 0 of file 4
    for i in range(5):
        assert torch.equal(download[i][0], converted[i][0]) and torch.equal(download[i][1], converted[i][1])
    np.testing.assert_array_equal(download[1][1].numpy(), scenes[2][1])


def test_a_split_left_with_no_scene_is_an_error_here_and_in_the_converter(tmp_path):
    src = tmp_path / "src"
    folder = src / "jaco" / "train"
    folder.mkdir(parents=True)
    (folder / "0001-of-3600.tfrecord").write_bytes(b"")
    for skip in (False, True):
        error = CorruptRecordError if not skip else DatasetFormatError
        with pytest.raises(error, match="0001-of-3600.tfrecord.*the file is empty"):
            record_dataset(src, "jaco", skip_corrupt=skip)
        with pytest.raises(error, match="the file is empty"):
            convert_deepmind(src, tmp_path / "out", "jaco", splits=("train",), skip_corrupt=skip, progress=False)
    assert not (tmp_path / "out" / "train" / "manifest.json").exists()


def test_a_record_missing_a_feature_is_named(tmp_path):
    src = tmp_path / "src"
    folder = src / "jaco" / "train"
    folder.mkdir(parents=True)
    frames = [jpeg(x) for x in smooth_images(np.random.default_rng(1), 11, 64)]
    no_cameras = example({"frames": frames})
    no_frames = example({"cameras": np.zeros(55, np.float32)})
    for record, feature in ((no_cameras, "cameras"), (no_frames, "frames")):
        (folder / "0001-of-3600.tfrecord").write_bytes(frame_record(record))
        pattern = rf"record 0: '{feature}': missing \(the record's features: (frames|cameras)\)"
        with pytest.raises(CorruptRecordError, match=pattern):
            record_dataset(src, "jaco")
        with pytest.raises(CorruptRecordError, match=pattern):
            convert_deepmind(src, tmp_path / "out", "jaco", splits=("train",), progress=False)


def test_which_set_a_folder_holds(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, "mazes", "train", [1], seed=2)
    write_dataset(src, "shepard_metzler_5_parts", "test", [1], seed=2)
    # Named by its folder, by its parent's child, or by its files' count where only one set has it.
    assert inspect_folder(src / "mazes").dataset == "mazes"
    assert inspect_folder(src / "shepard_metzler_5_parts").kind == DOWNLOAD
    (src / "mazes").rename(tmp_path / "labyrinths")
    assert inspect_folder(tmp_path / "labyrinths").dataset == "mazes"
    (src / "shepard_metzler_5_parts").rename(tmp_path / "sm")
    with pytest.raises(UsageError, match=r"which set\? \(its files' names fit shepard_metzler_5_parts, "):
        inspect_folder(tmp_path / "sm")
    assert inspect_folder(tmp_path / "sm", "shepard_metzler_7_parts").dataset == "shepard_metzler_7_parts"
    with pytest.raises(UsageError, match="--dataset: expected one of .*jaco"):
        inspect_folder(tmp_path / "sm", "rooms")
    convert_deepmind(tmp_path / "labyrinths", tmp_path / "out", "mazes", splits=("train",), progress=False)
    assert inspect_folder(tmp_path / "out").kind == CONVERTED
    assert isinstance(open_dataset(tmp_path / "out", "train"), SceneDataset)
    assert isinstance(open_dataset(tmp_path / "labyrinths", "train", progress=False), RecordDataset)


def test_indexing_and_converting_import_no_torch(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [1], seed=9)
    write_dataset(src, "rooms_ring_camera", "test", [1], seed=9)
    script = f"""
import sys
from gqn_fast.cli import main
from gqn_fast.data.catalog import DEEPMIND_DATASETS
from gqn_fast.data.record_index import open_index
index = open_index({str(src / "rooms_ring_camera" / "train")!r}, DEEPMIND_DATASETS["rooms_ring_camera"], "train",
                   progress=False)
assert len(index.offset) == 1
assert main(["data", "convert-deepmind", {str(src)!r}, {str(tmp_path / "out")!r}, "--dataset",
             "rooms_ring_camera", "--quiet", "--workers", "1"]) == 0
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    env = {**os.environ, "GQN_FAST_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["num_scenes"] == 1


def _train(*args):
    """`gqn-fast train` on one thread (a shared machine's cores wait on each other), then torch's threads as they were."""
    common = ["--preset", "small", "--batch", "3", "--max-context", "3", "--log-every", "1", "--image-every", "1000"]
    before = torch.get_num_threads()
    try:
        return main(["train", *args, *common, "--checkpoint-every", "1", "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(before)


def test_train_resume_eval_and_show_on_the_download_write_nothing_into_it(tmp_path, capsys, monkeypatch):
    src = tmp_path / "gqn-datasets"
    write_dataset(src, "rooms_ring_camera", "train", [4, 3], seed=12)
    write_dataset(src, "rooms_ring_camera", "test", [2], seed=13)
    convert_deepmind(src, tmp_path / "converted", "rooms_ring_camera", workers=1, progress=False)
    download = src / "rooms_ring_camera"
    before = listing(src)
    monkeypatch.chdir(tmp_path)
    workers = []  # each run's loader workers: without --workers, what the data needs on the CPU
    make_loader = loader_module.make_loader  # imported by train when it runs
    monkeypatch.setattr(
        loader_module, "make_loader", lambda *a, **k: workers.append(k["num_workers"]) or make_loader(*a, **k)
    )
    # Stopped at step 1 and resumed on the download == 2 steps straight on the converted arrays.
    assert _train("--data", str(download), "--steps", "1", "--out", "on-download") == 0
    assert _train("--data", str(download), "--steps", "2", "--out", "on-download", "--resume", "--workers", "2") == 0
    assert _train("--data", str(tmp_path / "converted"), "--steps", "2", "--out", "converted") == 0
    assert workers == [1, 2, 0]
    resumed, straight = (
        load_checkpoint(tmp_path / run / "checkpoints" / "step-00000002.pt") for run in ("on-download", "converted")
    )
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    config = json.loads((tmp_path / "on-download" / "config.json").read_text())
    assert config["data"] == {"kind": "download", "dataset": "rooms_ring_camera"}
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["data"]["kind"] == "converted"
    checkpoint = str(tmp_path / "on-download" / "checkpoints" / "step-00000002.pt")
    assert main(["eval", checkpoint, "--scenes", "2", "--max-context", "1", "--samples", "1", "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "on-download" / "eval" / "step-00000002" / "metrics.json").read_text())
    assert metrics["scenes"] == 2
    assert main(["data", "show", str(download), "--scenes", "2", "--views", "3"]) == 0
    assert (tmp_path / "preview-rooms_ring_camera-train.png").is_file()
    assert listing(src) == before
    # A folder whose name and files do not say which set it holds.
    write_dataset(tmp_path / "elsewhere", "shepard_metzler_7_parts", "train", [1], seed=14)
    (tmp_path / "elsewhere" / "shepard_metzler_7_parts").rename(tmp_path / "sm")
    capsys.readouterr()
    assert _train("--data", str(tmp_path / "sm"), "--steps", "1", "--out", "sm-run") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --dataset, one of jaco, mazes" in err


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the process table in /proc (Linux)")
def test_ctrl_c_ends_the_loader_and_its_worker_processes(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [6], seed=15)
    script = f"""
import multiprocessing, sys
from gqn_fast.data.folder import open_dataset
from gqn_fast.data.loader import make_loader
loader = make_loader(open_dataset({str(src / "rooms_ring_camera")!r}, "train", progress=False), "train", 2, 5, seed=0,
                     num_workers=2, pin_memory=False)
try:
    for epoch in range(10**6):
        loader.set_epoch(epoch)
        for k, batch in enumerate(loader):
            if epoch == 0 and k == 0:
                print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""
    env = {**os.environ, "GQN_FAST_CACHE": str(tmp_path / "cache")}
    run = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        workers = [int(pid) for pid in run.stdout.readline().split()]
        assert len(workers) == 2
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        assert run.wait(timeout=60) == 130 and run.stdout.read().strip() == "interrupted"
    finally:
        run.kill()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
