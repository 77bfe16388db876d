"""The on-disk format, the dataset writer (`data make`), the cache of built-in sets and `data show`."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from gqn_fast.cli import main
from gqn_fast.data import DatasetFormatError, SceneDataset, builtin_dataset, make_dataset, open_split
from gqn_fast.data.builtin import split_sizes
from gqn_fast.data.format import NpyAppender, SplitWriter, read_manifest, shrink_npy
from gqn_fast.data.scenes import render_scenes, sample_scenes

SCENES = 12  # 11 train + 1 test


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "rooms", "rooms", SCENES, seed=5, progress=False)


@pytest.fixture
def copy(rooms, tmp_path):
    """A scratch copy of the dataset, to damage."""
    return shutil.copytree(rooms, tmp_path / "copy")


def test_make_writes_both_splits_in_the_spec_format(rooms):
    sizes = split_sizes(SCENES)
    assert sizes == {"train": 11, "test": 1}
    for split, n in sizes.items():
        images = np.load(rooms / split / "images.npy", mmap_mode="r")
        cameras = np.load(rooms / split / "cameras.npy", mmap_mode="r")
        assert images.dtype == np.uint8 and images.shape == (n, 10, 64, 64, 3)
        assert cameras.dtype == np.float32 and cameras.shape == (n, 10, 5)
        manifest = json.loads((rooms / split / "manifest.json").read_text())
        assert manifest["name"] == "rooms" and manifest["split"] == split
        assert (manifest["num_scenes"], manifest["num_views"], manifest["image_size"]) == (n, 10, 64)
        assert manifest["version"] == 1 and "seed 5" in manifest["source"]
        # The scenes are the sampler's and the renderer's, in order.
        np.testing.assert_array_equal(cameras, sample_scenes("rooms", 5, split, 0, n)[1])
        expected_images, _ = render_scenes("rooms", 5, split, n - 1, n)
        np.testing.assert_array_equal(images[n - 1 :], expected_images)
    assert not list(rooms.parent.glob("*.partial-*"))


def test_two_worker_processes_write_the_same_set(rooms, tmp_path):
    other = make_dataset(tmp_path / "two", "rooms", SCENES, seed=5, workers=2, chunk=3, progress=False)
    for split in ("train", "test"):
        for name in ("images.npy", "cameras.npy"):
            np.testing.assert_array_equal(np.load(rooms / split / name), np.load(other / split / name))


def test_make_refuses_a_non_empty_folder(rooms):
    with pytest.raises(FileExistsError, match="not empty"):
        make_dataset(rooms, "rooms", SCENES, progress=False)
    with pytest.raises(ValueError, match="scenes"):
        split_sizes(1)


def test_scene_dataset_reads_scenes(rooms):
    ds = SceneDataset(rooms, "train")
    assert len(ds) == 11 and ds.num_views == 10
    images, cameras = ds[3]
    assert images.dtype.is_floating_point is False and images.shape == (10, 64, 64, 3)
    assert cameras.shape == (10, 5)
    np.testing.assert_array_equal(images.numpy(), np.load(rooms / "train" / "images.npy")[3])
    np.testing.assert_array_equal(ds[-1][0].numpy(), np.load(rooms / "train" / "images.npy")[10])
    with pytest.raises(IndexError):
        ds[11]


def _save(path, array):
    np.save(path, array)


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda d: (d / "manifest.json").unlink(), "manifest.json", "missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json", "not valid JSON"),
        (lambda d: (d / "images.npy").unlink(), "images.npy", "missing"),
        (
            lambda d: _save(d / "images.npy", np.load(d / "images.npy").astype(np.float32)),
            "images.npy",
            "expected dtype uint8, got float32",
        ),
        (
            lambda d: _save(d / "images.npy", np.load(d / "images.npy")[:, :, :32]),
            "images.npy",
            r"expected shape \(N, T, 64, 64, 3\)",
        ),
        (
            lambda d: _save(d / "cameras.npy", np.load(d / "cameras.npy").astype(np.float64)),
            "cameras.npy",
            "expected dtype float32, got float64",
        ),
        (
            lambda d: _save(d / "cameras.npy", np.load(d / "cameras.npy")[..., :4]),
            "cameras.npy",
            r"expected shape \(N, T, 5\)",
        ),
        (lambda d: _save(d / "cameras.npy", np.load(d / "cameras.npy")[:5]), "cameras.npy", "disagrees"),
        (lambda d: _save(d / "images.npy", np.load(d / "images.npy")[:5]), "cameras.npy", "disagrees"),
        (lambda d: _rewrite_manifest(d, num_scenes=12), "manifest.json", "num_scenes, num_views"),
        (lambda d: _rewrite_manifest(d, version=99), "manifest.json", "format version"),
        (lambda d: _truncate(d / "images.npy"), "images.npy", "truncated or corrupt"),
        (lambda d: _append(d / "images.npy", b"\0" * 100), "images.npy", "bytes, but its header.s shape"),
        (lambda d: _nan_camera(d / "cameras.npy", 4), "cameras.npy", "scene 4"),
        (lambda d: _save(d / "images.npy", np.asfortranarray(np.load(d / "images.npy"))), "images.npy", "Fortran"),
    ],
)
def test_a_damaged_split_names_the_file_and_the_problem(copy, damage, file, message):
    split_dir = copy / "train"
    damage(split_dir)
    with pytest.raises(DatasetFormatError, match=message) as caught:
        SceneDataset(copy, "train")
    assert str(split_dir / file) in str(caught.value)


def _rewrite_manifest(split_dir, **changes):
    manifest = json.loads((split_dir / "manifest.json").read_text())
    manifest.update(changes)
    (split_dir / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path):
    with open(path, "rb+") as f:
        f.truncate(path.stat().st_size // 2)


def _append(path, extra):
    with open(path, "ab") as f:
        f.write(extra)


def _nan_camera(path, scene):
    cameras = np.load(path)
    cameras[scene, 3, 1] = np.nan
    np.save(path, cameras)


def test_a_missing_split_or_wrong_name_is_reported(copy):
    shutil.rmtree(copy / "test")
    with pytest.raises(DatasetFormatError, match="no such split folder"):
        open_split(copy / "test")
    with pytest.raises(ValueError, match="split"):
        SceneDataset(copy, "validation")
    with pytest.raises(FileNotFoundError, match="nothere: no such dataset folder"):
        SceneDataset(copy.parent / "nothere", "train")


def test_split_writer_resumes_and_appender_streams(tmp_path):
    writer = SplitWriter(tmp_path / "train", 4, 2)
    images = np.random.default_rng(0).integers(0, 255, (4, 2, 64, 64, 3), dtype=np.uint8)
    cameras = np.random.default_rng(1).standard_normal((4, 2, 5)).astype(np.float32)
    writer.write(0, images[:2], cameras[:2])
    del writer
    writer = SplitWriter(tmp_path / "train", 4, 2, resume=True)
    writer.write(2, images[2:], cameras[2:])
    with pytest.raises(ValueError, match="do not fit"):
        writer.write(3, images[:2], cameras[:2])
    writer.finish(name="x", source="test")
    got_images, got_cameras, manifest = open_split(tmp_path / "train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_cameras, cameras)
    assert read_manifest(tmp_path / "train") == manifest
    with pytest.raises(DatasetFormatError, match="cannot resume"):
        SplitWriter(tmp_path / "train", 5, 2, resume=True)

    appender = NpyAppender(tmp_path / "rows.npy", np.float32, (2, 5))
    appender.append(cameras[:1])
    appender.append(cameras[1:])
    appender.close()
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), cameras)
    shrink_npy(tmp_path / "rows.npy", 1)
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), cameras[:1])


def test_builtin_dataset_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GQN_FAST_CACHE", str(tmp_path / "cache"))
    # A run interrupted mid-way left a partial folder; it is cleaned up, never used.
    stale = tmp_path / "cache" / "shepard_metzler-4-0.partial-999"
    (stale / "train").mkdir(parents=True)
    root = builtin_dataset("shepard_metzler", scenes=4, progress=False)
    assert root == tmp_path / "cache" / "shepard_metzler-4-0"
    assert not stale.exists()
    assert len(SceneDataset(root, "train")) == 3 and SceneDataset(root, "test").num_views == 15
    stamp = (root / "train" / "images.npy").stat().st_mtime_ns
    assert builtin_dataset("shepard_metzler", scenes=4, progress=False) == root
    assert (root / "train" / "images.npy").stat().st_mtime_ns == stamp  # not generated again
    # An incomplete set (no manifest) is regenerated.
    (root / "test" / "manifest.json").unlink()
    assert builtin_dataset("shepard_metzler", scenes=4, progress=False) == root
    assert SceneDataset(root, "test").num_scenes == 1
    # An explicit cache_dir wins over the environment.
    other = builtin_dataset("shepard_metzler", scenes=4, cache_dir=tmp_path / "elsewhere", progress=False)
    assert other.parent == tmp_path / "elsewhere"


def test_cli_make_and_show(tmp_path, capsys):
    out = tmp_path / "sm7"
    assert (
        main(
            [
                "data",
                "make",
                "shepard_metzler",
                "--parts",
                "7",
                "--scenes",
                "3",
                "--out",
                str(out),
                "--seed",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["name"] == "shepard_metzler_7" and manifest["num_views"] == 15
    images = np.load(out / "train" / "images.npy")
    np.testing.assert_array_equal(images, render_scenes("shepard_metzler_7", 2, "train", 0, 2)[0])

    assert main(["data", "show", str(out), "--scenes", "2", "--views", "4"]) == 0
    png = np.asarray(Image.open(out / "preview-train.png"))
    assert png.shape == (2 + 2 * 66, 2 + 4 * 66, 3)
    np.testing.assert_array_equal(png[2:66, 2:66], images[0, 0])
    np.testing.assert_array_equal(png[68:132, 200:264], images[1, 3])
    assert "preview-train.png" in capsys.readouterr().out

    assert main(["data", "make", "rooms", "--scenes", "3", "--out", str(out), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "make", "rooms", "--parts", "7", "--scenes", "3", "--out", str(tmp_path / "x")]) == 1
    assert main(["data", "show", str(tmp_path / "nothing")]) == 1
    assert "nothing: no such dataset folder" in capsys.readouterr().err
