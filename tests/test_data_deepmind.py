"""Reading DeepMind's gqn-datasets without TensorFlow: TFRecord framing, tf.train.Example, the converter.

The TFRecord files are written by tests/deepmind_files.py, independently of gqn_fast's reader,
under the names DeepMind's own reader opens (`001-of-900.tfrecord`, `0001-of-2160.tfrecord`).
"""

import io
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deepmind_files import (
    RELEASE_FILES,
    RELEASE_FRAMES,
    crc32c_bitwise,
    crc32c_table,
    example,
    field,
    file_name,
    frame_record,
    jpeg,
    masked,
    smooth_images,
    varint,
    write_dataset,
)
from helpers import interrupt_when
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import gqn_fast.data.deepmind as deepmind
from gqn_fast.cli import main
from gqn_fast.data import CorruptRecordError, SceneDataset
from gqn_fast.data.deepmind import DEEPMIND_DATASETS, convert_deepmind
from gqn_fast.data.resize import area_resize, area_weights
from gqn_fast.data.tfrecord import crc32c, masked_crc32c, parse_example, read_records, scan_frames, scan_records

# The reader checks every record's CRC32C with google-crc32c (a dependency; --no-deps installs lack it).
pytest.importorskip("google_crc32c")


def downsample(images, size=64):
    """A box filter, applied to the original (not the JPEG) frames."""
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BOX)) for x in images])


def _area_mean_rows(x, size):
    """[..., A, W, C] -> [..., size, W, C]: upsample the rows by repetition to a common multiple of
    A and size, where every output row covers a whole block of rows, then average the blocks."""
    a = x.shape[-3]
    common = math.lcm(a, size)
    up = np.repeat(x, common // a, axis=-3)
    return up.reshape(*x.shape[:-3], size, common // size, *x.shape[-2:]).mean(axis=-3)


def area_mean_float64(images, size=64):
    """The area resize in float64, independently of the converter's weights: rows, then columns
    (a pixel's area is the product of its two sides)."""
    rows = _area_mean_rows(images.astype(np.float64), size)
    return _area_mean_rows(rows.swapaxes(-3, -2), size).swapaxes(-3, -2)


def assert_area_resized(got, images):
    """Within half a level (the one rounding) of the float64 area mean."""
    error = np.abs(got.astype(np.float64) - area_mean_float64(images, got.shape[-2]))
    assert error.max() <= 0.5 + 1e-9, error.max()


def decode_jpegs(images):
    """What PIL decodes each frame's JPEG to: the converter's input."""
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg(x))).convert("RGB")) for x in images])


def assert_within_jpeg_error(got, expected):
    error = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert error.mean() < 2.0 and error.max() <= 24, (error.mean(), error.max())


# ---------------------------------------------------------------------------------------


def test_crc32c_and_its_mask():
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"123456789") == 0xE3069283
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert crc32c(data) == crc32c_bitwise(data) == crc32c_table(data)
        assert masked_crc32c(data) == masked(data)


def test_parse_example_reads_every_list_type():
    features = parse_example(
        example(
            {
                "frames": [b"\xff\xd8one", b"two"],
                "cameras": np.array([1.5, -2.25, 3.0], np.float32),
                "loose": ("unpacked", [0.5, -1.0]),
                "ids": ("int64", [3, -7, 2**40]),
            }
        )
    )
    assert features["frames"] == [b"\xff\xd8one", b"two"]
    np.testing.assert_array_equal(features["cameras"], [1.5, -2.25, 3.0])
    assert features["cameras"].dtype == np.float32
    np.testing.assert_array_equal(features["loose"], [0.5, -1.0])
    np.testing.assert_array_equal(features["ids"], [3, -7, 2**40])
    with pytest.raises(ValueError):
        parse_example(b"\x0a\x05ab")  # a field longer than the message


@given(
    frames=st.lists(st.binary(max_size=300) | st.sampled_from([b"", bytes(16384), bytes(70000)]), max_size=20),
    cameras=st.lists(st.floats(width=32, allow_nan=False), max_size=40),
    ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
)
def test_parse_example_reads_what_was_written(frames, cameras, ids):
    # sizes of one, two and three varint bytes: the bytes list's inline reading and its general one
    features = parse_example(
        example({"frames": frames, "cameras": np.array(cameras, np.float32), "ids": ("int64", ids)})
    )
    assert len(features["frames"]) == len(frames)
    assert features["frames"] == frames and list(features["frames"]) == frames
    assert features["frames"][1:3] == frames[1:3]
    np.testing.assert_array_equal(features["cameras"], np.array(cameras, np.float32))
    np.testing.assert_array_equal(features["ids"], ids)


def test_parse_example_reads_a_bytes_list_with_other_fields():
    # A value, an unknown varint field, a value: the tight loop hands over to the general reading.
    body = field(1, b"first") + varint(2 << 3) + varint(300) + field(1, b"second")
    data = field(1, field(1, field(1, b"frames") + field(2, field(1, body))))
    assert parse_example(data)["frames"] == [b"first", b"second"]


@given(st.binary(max_size=200), st.data())
def test_parse_example_refuses_broken_bytes_with_value_error(tail, data):
    # Whatever the bytes, an Example or a ValueError: never an IndexError or garbage.
    whole = example({"frames": [b"ab", b"cde"], "cameras": np.array([1.0], np.float32)})
    cut = data.draw(st.integers(0, len(whole)))
    for candidate in (whole[:cut], whole[:cut] + tail, tail):
        try:
            features = parse_example(candidate)
        except ValueError:
            continue
        assert isinstance(features, dict)


def _records_file(tmp_path, payloads):
    path = tmp_path / "x.tfrecord"
    path.write_bytes(b"".join(frame_record(p) for p in payloads))
    return path


def test_read_records_verifies_framing_and_checksums(tmp_path):
    payloads = [b"first", b"second record", b"third"]
    path = _records_file(tmp_path, payloads)
    assert list(read_records(path)) == payloads
    raw = path.read_bytes()
    second = 12 + 5 + 4  # where record 1 starts
    cases = {
        "truncated": raw[: len(raw) - 3],
        "data checksum mismatch": raw[: second + 12] + b"S" + raw[second + 13 :],
        "length checksum mismatch": raw[:second] + b"\x0e" + raw[second + 1 :],
    }
    for problem, data in cases.items():
        path.write_bytes(data)
        index = 2 if problem == "truncated" else 1
        with pytest.raises(CorruptRecordError, match=problem) as caught:
            list(read_records(path))
        assert caught.value.index == index and caught.value.path == str(path)
        assert f"{path}: record {index}" in str(caught.value)


def test_count_records_reads_the_framing_as_scan_records_does(tmp_path):
    payloads = [b"first", b"second record", b"third"]
    path = _records_file(tmp_path, payloads)
    raw = path.read_bytes()
    second = 12 + 5 + 4
    cases = {
        "whole": raw,
        "truncated": raw[: len(raw) - 3],
        "a bad payload": raw[: second + 12] + b"S" + raw[second + 13 :],
        "a bad length": raw[:second] + b"\x0e" + raw[second + 1 :],
        "empty": b"",
        "a short header": raw[:7],
    }
    expected = {"whole": 3, "truncated": 2, "a bad payload": 3, "a bad length": 1, "empty": 0, "a short header": 0}
    for case, data in cases.items():
        path.write_bytes(data)
        items = list(scan_records(path))
        # scan_records ends with the broken frame, if any; a bad payload is a record in its frame.
        broken = (
            bool(items)
            and isinstance(items[-1][1], CorruptRecordError)
            and items[-1][1].problem != "data checksum mismatch"
        )
        assert deepmind.count_records(path) == expected[case] == len(items) - broken, case


class Stop(BaseException):
    """Stands for a kill in the middle of a conversion."""


def test_a_stopped_conversion_whose_source_grew_starts_the_split_over(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [2, 1], seed=31)
    real, calls = deepmind.convert_file, []

    def stop_after_one(task, *args):
        if calls:
            raise Stop
        calls.append(task.source.name)
        return real(task, *args)

    with monkeypatch.context() as m:
        m.setattr(deepmind, "convert_file", stop_after_one)
        with pytest.raises(Stop):
            convert_deepmind(src, tmp_path / "out", "rooms_ring_camera", splits=("train",), workers=1, progress=False)
    assert calls == ["0001-of-2160.tfrecord"] and (tmp_path / "out" / "train" / ".parts" / "plan.json").is_file()
    write_dataset(src / "more", "rooms_ring_camera", "train", [3], seed=32, numbers=[2])
    (src / "more" / "rooms_ring_camera" / "train" / "0002-of-2160.tfrecord").replace(
        src / "rooms_ring_camera" / "train" / "0002-of-2160.tfrecord"
    )  # another second file, of 3 scenes
    convert_deepmind(src, tmp_path / "out", "rooms_ring_camera", splits=("train",), workers=1, progress=False)
    convert_deepmind(src, tmp_path / "clean", "rooms_ring_camera", splits=("train",), workers=1, progress=False)
    assert _snapshot(tmp_path / "out") == _snapshot(tmp_path / "clean")
    assert SceneDataset(tmp_path / "out", "train").manifest["num_scenes"] == 5


def test_convert_round_trip_64px_through_the_cli(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    train = write_dataset(src, "rooms_ring_camera", "train", [3, 2], seed=1)
    test = write_dataset(src, "rooms_ring_camera", "test", [2], seed=2)
    code = main(
        ["data", "convert-deepmind", str(src), str(out), "--dataset", "rooms_ring_camera", "--quiet", "--workers", "2"]
    )
    assert code == 0
    report = capsys.readouterr().out
    assert "train: 5 scenes from 2 files (the full release has 2160)" in report
    for split, scenes in (("train", train), ("test", test)):
        ds = SceneDataset(out, split)
        assert len(ds) == len(scenes) and ds.num_views == 10
        assert ds.manifest["name"] == "rooms_ring_camera" and "DeepMind" in ds.manifest["source"]
        for i, (images, cameras) in enumerate(scenes):
            got_images, got_cameras = ds[i]
            np.testing.assert_array_equal(got_cameras.numpy(), cameras)  # file order, then record order
            assert_within_jpeg_error(got_images.numpy(), images)
            # Exactly what the JPEG decodes to.
            decoded = np.stack([np.asarray(Image.open(io.BytesIO(jpeg(x))).convert("RGB")) for x in images])
            np.testing.assert_array_equal(got_images.numpy(), decoded)
    assert not (out / "train" / ".parts").exists()


def test_convert_resizes_128px_and_84px_sets(tmp_path):
    src = tmp_path / "src"
    scenes = write_dataset(src, "rooms_free_camera_with_object_rotations", "train", [2], seed=3)
    write_dataset(src, "rooms_free_camera_with_object_rotations", "test", [1], seed=4)
    convert_deepmind(src, tmp_path / "rooms128", "rooms_free_camera_with_object_rotations", workers=1, progress=False)
    ds = SceneDataset(tmp_path / "rooms128", "train")
    for i, (images, cameras) in enumerate(scenes):
        assert ds[i][0].shape == (10, 64, 64, 3)
        assert_within_jpeg_error(ds[i][0].numpy(), downsample(images))
        assert_area_resized(ds[i][0].numpy(), decode_jpegs(images))  # the exact 2x2 mean, rounded once
        np.testing.assert_array_equal(ds[i][1].numpy(), cameras)
    # mazes: 84 px, T = 300; SRC may also be the dataset's own folder.
    mazes = write_dataset(src, "mazes", "test", [1], seed=5)
    convert_deepmind(src / "mazes", tmp_path / "mazes", "mazes", splits=("test",), progress=False)
    ds = SceneDataset(tmp_path / "mazes", "test")
    assert ds.num_views == 300
    assert_within_jpeg_error(ds[0][0].numpy(), downsample(mazes[0][0]))
    assert_area_resized(ds[0][0].numpy(), decode_jpegs(mazes[0][0]))  # fractional pixel weights


def test_area_resize_against_a_float64_reference():
    """Sharp random pixels and a fine stripe pattern, where a whole-pixel box filter aliases."""
    rng = np.random.default_rng(9)
    stripes = np.zeros((1, 84, 84, 3), np.uint8)
    stripes[:, :, ::2] = 255  # one-pixel stripes
    for size, images in (
        (128, rng.integers(0, 256, (4, 128, 128, 3), dtype=np.uint8)),
        (84, rng.integers(0, 256, (4, 84, 84, 3), dtype=np.uint8)),
        (84, stripes),
        (7, rng.integers(0, 256, (2, 7, 7, 1), dtype=np.uint8)),
    ):
        target = 64 if size != 7 else 3
        got = area_resize(images, target)
        assert got.shape == (images.shape[0], target, target, images.shape[-1]) and got.dtype == np.uint8
        assert_area_resized(got, images)
    np.testing.assert_array_equal(area_resize(stripes, 84), stripes)  # the same size: unchanged
    # A whole-pixel box filter fails the same check: the check tells an area resize from one.
    box_error = np.abs(downsample(stripes) - area_mean_float64(stripes))
    assert box_error.max() > 50
    weights = area_weights(84, 64)
    assert (weights.sum(axis=1) == 21).all() and weights.max() == 16
    with pytest.raises(ValueError, match="size"):
        area_resize(stripes, 85)
    with pytest.raises(TypeError, match="images"):
        area_resize(stripes.astype(np.float32), 64)


@given(a=st.integers(2, 130), data=st.data())
def test_area_resize_is_the_rounded_float64_area_mean_at_any_size(a, data):
    """Integer factors and fractional ones, with random, constant and extreme pixels."""
    b = data.draw(st.integers(1, a), label="b")
    kind = data.draw(st.sampled_from(["random", "zeros", "full", "checker"]), label="kind")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    images = {
        "random": rng.integers(0, 256, (3, a, a, 3)),
        "zeros": np.zeros((3, a, a, 3)),
        "full": np.full((3, a, a, 3), 255),
        "checker": (np.indices((3, a, a, 3)).sum(0) % 2) * 255,
    }[kind]
    images = images.astype(np.uint8)
    got = area_resize(images, b)
    assert got.shape == (3, b, b, 3) and got.dtype == np.uint8
    assert_area_resized(got, images)
    if kind in ("zeros", "full"):
        np.testing.assert_array_equal(got, images[:, :b, :b])


def test_files_of_20_and_of_2000_scenes(tmp_path):
    """Record files of both sizes DeepMind ships, converted in parallel; identical records reuse
    their JPEGs so the test stays fast."""
    rng = np.random.default_rng(6)
    variants = []
    for _ in range(3):
        images = smooth_images(rng, 10, 64)
        cameras = rng.uniform(-3, 3, (10, 5)).astype(np.float32)
        variants.append(
            (frame_record(example({"frames": [jpeg(x) for x in images], "cameras": cameras.ravel()})), cameras)
        )
    src = tmp_path / "src" / "rooms_ring_camera"
    for split, counts in (("train", [2000, 20]), ("test", [20])):
        (src / split).mkdir(parents=True)
        for i, count in enumerate(counts):
            with open(src / split / file_name("rooms_ring_camera", split, i + 1), "wb") as f:
                f.write(b"".join(variants[k % 3][0] for k in range(count)))
    report = convert_deepmind(tmp_path / "src", tmp_path / "out", "rooms_ring_camera", workers=2, progress=False)
    assert report["train"]["scenes"] == 2020 and report["test"]["scenes"] == 20
    cameras = np.load(tmp_path / "out" / "train" / "cameras.npy")
    expected = [variants[k % 3][1] for k in range(2000)] + [variants[k % 3][1] for k in range(20)]
    np.testing.assert_array_equal(cameras, np.stack(expected))


def _truncate_last_record(path):
    with open(path, "rb+") as f:
        f.truncate(path.stat().st_size - 100)


def test_corrupt_records_raise_or_are_skipped_and_finished_files_are_kept(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    scenes = write_dataset(src, "shepard_metzler_5_parts", "train", [2, 3, 2], seed=7)
    write_dataset(src, "shepard_metzler_5_parts", "test", [1], seed=8)
    bad = src / "shepard_metzler_5_parts" / "train" / "002-of-900.tfrecord"
    _truncate_last_record(bad)

    converted = []
    real = deepmind.convert_file
    monkeypatch.setattr(deepmind, "convert_file", lambda task, *a: converted.append(task.source.name) or real(task, *a))

    # Without --skip-corrupt: an error naming the file and the record; the good files are kept.
    with pytest.raises(CorruptRecordError) as caught:
        convert_deepmind(src, out, "shepard_metzler_5_parts", workers=1, progress=False)
    assert caught.value.path == str(bad) and caught.value.index == 2 and "truncated" in str(caught.value)
    assert (out / "train" / ".parts" / "001-of-900.tfrecord.done.json").is_file()
    assert not (out / "train" / "manifest.json").exists()

    # Run again, skipping: only the unfinished files are converted.
    converted.clear()
    code = main(
        [
            "data",
            "convert-deepmind",
            str(src),
            str(out),
            "--dataset",
            "shepard_metzler_5_parts",
            "--skip-corrupt",
            "--quiet",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    assert "001-of-900.tfrecord" not in converted and "002-of-900.tfrecord" in converted
    assert "skipped 002-of-900.tfrecord record 2: truncated" in capsys.readouterr().out
    ds = SceneDataset(out, "train")
    assert len(ds) == 6  # 2 + 2 readable of 3 + 2
    kept = scenes[:2] + scenes[2:4] + scenes[5:]
    for i, (_, cameras) in enumerate(kept):
        np.testing.assert_array_equal(ds[i][1].numpy(), cameras)
    skipped = ds.manifest["deepmind"]["skipped_records"]
    assert [s[:2] for s in skipped] == [["002-of-900.tfrecord", 2]]

    # A finished conversion is not redone, nor overwritten by another dataset.
    converted.clear()
    assert convert_deepmind(src, out, "shepard_metzler_5_parts", progress=False)["train"]["scenes"] == 6
    assert converted == []
    (src / "shepard_metzler_7_parts").symlink_to(src / "shepard_metzler_5_parts")
    with pytest.raises(FileExistsError, match="already holds dataset 'shepard_metzler_5_parts'"):
        convert_deepmind(src, out, "shepard_metzler_7_parts", progress=False)


def test_a_record_that_is_no_scene_is_reported(tmp_path, capsys):
    src = tmp_path / "src" / "jaco" / "train"
    src.mkdir(parents=True)
    good = example(
        {
            "frames": [jpeg(x) for x in smooth_images(np.random.default_rng(0), 11, 64)],
            "cameras": np.zeros(55, np.float32),
        }
    )
    few_frames = example({"frames": [jpeg(np.zeros((64, 64, 3), np.uint8))] * 3, "cameras": np.zeros(55, np.float32)})
    not_jpeg = example({"frames": [b"not a jpeg"] * 11, "cameras": np.zeros(55, np.float32)})
    (src / "0001-of-3600.tfrecord").write_bytes(b"".join(frame_record(r) for r in (good, few_frames, not_jpeg)))
    with pytest.raises(CorruptRecordError, match=r"record 1: 'frames': expected 11 JPEG strings, got 3"):
        convert_deepmind(tmp_path / "src", tmp_path / "out", "jaco", splits=("train",), progress=False)
    assert (
        main(
            [
                "data",
                "convert-deepmind",
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--dataset",
                "jaco",
                "--splits",
                "train",
                "--quiet",
            ]
        )
        == 1
    )
    assert "0001-of-3600.tfrecord: record 1" in capsys.readouterr().err
    report = convert_deepmind(
        tmp_path / "src", tmp_path / "out", "jaco", splits=("train",), skip_corrupt=True, progress=False
    )
    assert report["train"]["scenes"] == 1
    assert [s[1] for s in report["train"]["skipped"]] == [1, 2]
    assert "frame 0: not a decodable image" in report["train"]["skipped"][1][2]
    with pytest.raises(FileNotFoundError, match="test"):
        convert_deepmind(tmp_path / "src", tmp_path / "out2", "jaco", progress=False)


def _jpeg_variants():
    """Frames as encoders make them: chroma 4:2:0, 4:2:2 and 4:4:4, progressive, restart markers,
    grey, low quality, at every frame size DeepMind ships."""
    rng = np.random.default_rng(30)
    for size in (64, 84, 128):
        noisy = np.clip(smooth_images(rng, 1, size)[0] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        for options in (
            {},
            {"subsampling": 1},
            {"subsampling": 0},
            {"progressive": True},
            {"quality": 30},
            {"restart_marker_blocks": 2},
            {"optimize": True},
        ):
            yield size, jpeg(noisy, **options)
        yield size, jpeg(noisy[..., 0])  # a grey JPEG


def test_the_fast_jpeg_decode_gives_pil_bytes():
    """simplejpeg (libjpeg-turbo) where installed, PIL otherwise: the same pixels, byte for byte."""
    pytest.importorskip("simplejpeg")
    for size, data in _jpeg_variants():
        fast, slow = np.empty((size, size, 3), np.uint8), np.empty((size, size, 3), np.uint8)
        assert deepmind._decode_fast(data, fast)
        deepmind._decode_pil(data, slow, 0)
        np.testing.assert_array_equal(fast, slow)
        np.testing.assert_array_equal(fast, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 64), (10, 200, 30, 5)).save(cmyk, format="JPEG")
    out = np.empty((64, 64, 3), np.uint8)
    assert not deepmind._decode_fast(cmyk.getvalue(), out)  # another colour space: PIL decodes it
    assert not deepmind._decode_fast(jpeg(np.zeros((32, 32, 3), np.uint8)), out)  # another size: PIL names it
    assert not deepmind._decode_fast(b"not a jpeg", out)


def test_decode_scene_is_the_same_with_and_without_simplejpeg(monkeypatch):
    info = DEEPMIND_DATASETS["rooms_free_camera_with_object_rotations"]
    frames = [data for size, data in _jpeg_variants() if size == 128] * 2
    frames = frames[: info.num_views]
    record = example({"frames": frames, "cameras": np.arange(50, dtype=np.float32)})
    images, cameras = deepmind.decode_scene(record, info)
    monkeypatch.setattr(deepmind, "simplejpeg", None)
    pil_images, pil_cameras = deepmind.decode_scene(record, info)
    np.testing.assert_array_equal(images, pil_images)
    np.testing.assert_array_equal(cameras, pil_cameras)
    # Bad frames are named the same way on both paths.
    bad = example({"frames": frames[:9] + [b"not a jpeg"], "cameras": np.arange(50, dtype=np.float32)})
    with pytest.raises(ValueError, match="frame 9: not a decodable image"):
        deepmind.decode_scene(bad, info)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="frame 9: not a decodable image"):
        deepmind.decode_scene(bad, info)
    small = example({"frames": [jpeg(np.zeros((64, 64, 3), np.uint8))] * 10, "cameras": np.zeros(50, np.float32)})
    with pytest.raises(ValueError, match="frame 0: expected 128x128, got 64x64"):
        deepmind.decode_scene(small, info)


def test_every_deepmind_dataset_is_known():
    """Views, frame size and file counts of each set as DeepMind's data_reader.py lists them."""
    assert {name: (d.num_views, d.image_size) for name, d in DEEPMIND_DATASETS.items()} == RELEASE_FRAMES
    assert {name: (d.train_files, d.test_files) for name, d in DEEPMIND_DATASETS.items()} == RELEASE_FILES
    with pytest.raises(ValueError, match="dataset"):
        convert_deepmind(".", ".", "rooms")


# ---------------------------------------------------------------------------------------
# Faults: workers, bad checksums, stray files, changed sources, interrupts, kill -9


def _corrupt_payload(path, record, record_bytes):
    """Flip a byte inside record `record`'s payload (all records `record_bytes` long): the data
    checksum fails, the length and its checksum hold."""
    with open(path, "rb+") as f:
        f.seek(record * record_bytes + 12 + 40)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_the_converter_names_the_first_damaged_file_in_order_whichever_worker_meets_its_error_first(tmp_path):
    # File 1's damage is in its last record; file 3 is empty: its worker (done with the one record of
    # file 2) meets that error first, yet the error named is file 1's, as the index names it.
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [8, 1], seed=11)
    folder = src / "rooms_ring_camera" / "train"
    last = list(scan_frames(folder / "0001-of-2160.tfrecord"))[7]
    with open(folder / "0001-of-2160.tfrecord", "rb+") as f:  # a byte of its payload flipped
        f.seek(last.offset + last.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    (folder / "0003-of-2160.tfrecord").write_bytes(b"")
    for _ in range(3):
        with pytest.raises(CorruptRecordError) as caught:
            convert_deepmind(src, tmp_path / "out", "rooms_ring_camera", splits=("train",), workers=2, progress=False)
        assert (Path(caught.value.path).name, caught.value.index) == ("0001-of-2160.tfrecord", 7)


def test_corrupt_record_errors_travel_back_from_worker_processes(tmp_path, capsys):
    error = CorruptRecordError("/data/0002-of-0003.tfrecord", 4, "data checksum mismatch")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.index, copy.problem, str(copy)) == (error.path, 4, error.problem, str(error))
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [1, 2, 1], seed=10)
    bad = src / "rooms_ring_camera" / "train" / "0002-of-2160.tfrecord"
    _corrupt_payload(bad, 1, bad.stat().st_size // 2)
    with pytest.raises(CorruptRecordError, match="record 1: data checksum mismatch") as caught:
        convert_deepmind(src, tmp_path / "out", "rooms_ring_camera", splits=("train",), workers=2, progress=False)
    assert caught.value.path == str(bad) and caught.value.index == 1
    code = main(
        [
            "data",
            "convert-deepmind",
            str(src),
            str(tmp_path / "out"),
            "--dataset",
            "rooms_ring_camera",
            "--splits",
            "train",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert f"{bad}: record 1: data checksum mismatch" in err


def test_a_bad_data_checksum_skips_that_record_only(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    scenes = write_dataset(src, "rooms_ring_camera", "train", [4], seed=11)
    path = src / "rooms_ring_camera" / "train" / "0001-of-2160.tfrecord"
    size = path.stat().st_size // 4
    _corrupt_payload(path, 1, size)
    items = list(scan_records(path))
    assert [i for i, _ in items] == [0, 1, 2, 3] and isinstance(items[1][1], CorruptRecordError)
    assert all(isinstance(data, bytes) for i, data in items if i != 1)
    with pytest.raises(CorruptRecordError, match="record 1: data checksum mismatch"):
        convert_deepmind(src, out, "rooms_ring_camera", splits=("train",), progress=False)
    assert (
        main(
            [
                "data",
                "convert-deepmind",
                str(src),
                str(out),
                "--dataset",
                "rooms_ring_camera",
                "--splits",
                "train",
                "--skip-corrupt",
                "--quiet",
            ]
        )
        == 0
    )
    assert "skipped 0001-of-2160.tfrecord record 1: data checksum mismatch" in capsys.readouterr().out
    ds = SceneDataset(out, "train")
    assert len(ds) == 3  # records 0, 2 and 3: reading went on after the bad one
    for i, (_, cameras) in enumerate([scenes[0], scenes[2], scenes[3]]):
        np.testing.assert_array_equal(ds[i][1].numpy(), cameras)
    assert ds.manifest["deepmind"]["skipped_records"] == [["0001-of-2160.tfrecord", 1, "data checksum mismatch"]]


def test_only_deepmind_file_names_are_read(tmp_path):
    src = tmp_path / "src"
    scenes = write_dataset(src, "rooms_ring_camera", "train", [1, 2], seed=12)
    folder = src / "rooms_ring_camera" / "train"
    first = (folder / "0001-of-2160.tfrecord").read_bytes()
    (folder / "._0001-of-2160.tfrecord").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (folder / "0002-of-2160.tfrecord_.gstmp").write_bytes(first)  # gsutil's half-downloaded copy
    (folder / "notes.tfrecord.txt").write_text("not a record file")
    (folder / "0003-of-2160.tfrecord.bak").write_bytes(first)
    # Names DeepMind never uses for this split: another count, other padding, a number past the count.
    for stray in (
        "0001-of-0002.tfrecord",
        "001-of-240.tfrecord",
        "1-of-2160.tfrecord",
        "00001-of-02160.tfrecord",
        "0000-of-2160.tfrecord",
        "2161-of-2160.tfrecord",
    ):
        (folder / stray).write_bytes(first)
    assert [p.name for p in deepmind.source_files(src, "rooms_ring_camera", "train")] == [
        "0001-of-2160.tfrecord",
        "0002-of-2160.tfrecord",
    ]
    report = convert_deepmind(
        src, tmp_path / "out", "rooms_ring_camera", splits=("train",), skip_corrupt=True, progress=False
    )
    assert report["train"]["scenes"] == 3 and report["train"]["skipped"] == []
    cameras = np.load(tmp_path / "out" / "train" / "cameras.npy")
    np.testing.assert_array_equal(cameras, np.stack([c for _, c in scenes]))
    # A folder with none of the split's names: the error says which names that split has.
    for split, expected in (
        ("train", "0001-of-2160.tfrecord .. 2160-of-2160.tfrecord"),
        ("test", "001-of-240.tfrecord .. 240-of-240.tfrecord"),
    ):
        empty = tmp_path / "empty" / "rooms_ring_camera" / split
        empty.mkdir(parents=True)
        (empty / "._0001-of-0001.tfrecord").write_bytes(b"x")
        (empty / "0001-of-0240.tfrecord").write_bytes(first)  # the four-digit name the old converter wanted
        with pytest.raises(
            FileNotFoundError,
            match=f"{empty}: no TFRecord files named like {expected} for the {split} split of rooms_ring_camera",
        ):
            convert_deepmind(
                tmp_path / "empty", tmp_path / "out2", "rooms_ring_camera", splits=(split,), progress=False
            )


def test_file_names_follow_deepmind_reader_for_every_dataset_and_split():
    """The converter opens exactly the names data_reader.py's template makes, per dataset and split."""
    for name, (train, test) in RELEASE_FILES.items():
        for split, count in (("train", train), ("test", test)):
            for index in (1, 2, 9, 10, 99, 100, count - 1, count):
                if 1 <= index <= count:
                    assert deepmind.source_name(index, count) == file_name(name, split, index)
    assert file_name("shepard_metzler_7_parts", "train", 1) == "001-of-900.tfrecord"
    assert file_name("rooms_ring_camera", "test", 7) == "007-of-240.tfrecord"
    assert file_name("jaco", "train", 3600) == "3600-of-3600.tfrecord"


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", sorted(RELEASE_FILES))
def test_every_dataset_converts_under_deepmind_file_names(tmp_path, name, workers):
    """Both splits of each dataset, named as DeepMind's bucket names them, a partial download with
    gaps in the numbering; through the CLI, which reports the files against the full release."""
    src, out = tmp_path / "src", tmp_path / "out"
    train_count, test_count = RELEASE_FILES[name]
    views = RELEASE_FRAMES[name][0]
    per_file = 1 if views > 20 else 2  # mazes: 300 views a scene
    train = write_dataset(src, name, "train", [per_file, 1, per_file], seed=20, numbers=[1, 10, train_count])
    test = write_dataset(src, name, "test", [1, 1], seed=21, numbers=[2, 100])
    assert (
        main(["data", "convert-deepmind", str(src), str(out), "--dataset", name, "--quiet", "--workers", str(workers)])
        == 0
    )
    for split, scenes in (("train", train), ("test", test)):
        ds = SceneDataset(out, split)
        assert len(ds) == len(scenes) and ds.num_views == views
        np.testing.assert_array_equal(np.load(out / split / "cameras.npy"), np.stack([c for _, c in scenes]))
        expected = np.stack([area_resize(decode_jpegs(images), 64) for images, _ in scenes])
        np.testing.assert_array_equal(np.load(out / split / "images.npy"), expected)  # PIL's decode, resized
    listed = [f for f, _, _ in SceneDataset(out, "train").manifest["deepmind"]["files"]]
    assert listed == [file_name(name, "train", i) for i in (1, 10, train_count)]


def test_a_partial_download_converts_and_a_later_larger_one_is_refused(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_dataset(src, "shepard_metzler_7_parts", "train", [2, 1, 2], seed=22, numbers=[1, 2, 5])
    write_dataset(src, "shepard_metzler_7_parts", "test", [1], seed=23)
    assert (
        main(["data", "convert-deepmind", str(src), str(out), "--dataset", "shepard_metzler_7_parts", "--quiet"]) == 0
    )
    report = capsys.readouterr().out
    assert "train: 5 scenes from 3 files (the full release has 900)" in report
    assert "test: 1 scenes from 1 files (the full release has 100)" in report
    write_dataset(src / "more", "shepard_metzler_7_parts", "train", [1], seed=24, numbers=[3])
    (src / "more" / "shepard_metzler_7_parts" / "train" / "003-of-900.tfrecord").rename(
        src / "shepard_metzler_7_parts" / "train" / "003-of-900.tfrecord"
    )
    assert (
        main(["data", "convert-deepmind", str(src), str(out), "--dataset", "shepard_metzler_7_parts", "--quiet"]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (
        "converted from 3 files" in err and "now has 4 (1 new, 0 gone, 0 changed in size: 003-of-900.tfrecord)" in err
    )


def test_an_empty_file_is_named_and_skipped_only_when_asked(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    scenes = write_dataset(src, "shepard_metzler_5_parts", "train", [1, 2], seed=25, numbers=[1, 3])
    write_dataset(src, "shepard_metzler_5_parts", "test", [1], seed=26)
    empty = src / "shepard_metzler_5_parts" / "train" / "002-of-900.tfrecord"
    empty.write_bytes(b"")  # a download that failed
    with pytest.raises(CorruptRecordError, match="002-of-900.tfrecord: record 0: the file is empty"):
        convert_deepmind(src, out, "shepard_metzler_5_parts", progress=False)
    assert (
        main(["data", "convert-deepmind", str(src), str(out), "--dataset", "shepard_metzler_5_parts", "--quiet"]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{empty}: record 0: the file is empty (0 bytes)" in err
    assert not (out / "train" / "manifest.json").exists()
    assert (
        main(
            [
                "data",
                "convert-deepmind",
                str(src),
                str(out),
                "--dataset",
                "shepard_metzler_5_parts",
                "--quiet",
                "--skip-corrupt",
            ]
        )
        == 0
    )
    assert "skipped 002-of-900.tfrecord record 0: the file is empty (0 bytes)" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out / "train" / "cameras.npy"), np.stack([c for _, c in scenes]))


def test_a_finished_split_refuses_a_changed_source(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_dataset(src, "rooms_ring_camera", "train", [1, 1], seed=13)
    convert_deepmind(src, out, "rooms_ring_camera", splits=("train",), progress=False)
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    folder = src / "rooms_ring_camera" / "train"
    (folder / "0003-of-2160.tfrecord").write_bytes((folder / "0001-of-2160.tfrecord").read_bytes())
    with pytest.raises(
        FileExistsError,
        match=r"converted from 2 files .* now has 3 \(1 new, 0 gone, 0 changed in "
        r"size: 0003-of-2160.tfrecord\)",
    ):
        convert_deepmind(src, out, "rooms_ring_camera", splits=("train",), progress=False)
    assert (
        main(
            [
                "data",
                "convert-deepmind",
                str(src),
                str(out),
                "--dataset",
                "rooms_ring_camera",
                "--splits",
                "train",
                "--quiet",
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.count("\n") == 1
    (folder / "0003-of-2160.tfrecord").unlink()
    with open(folder / "0002-of-2160.tfrecord", "ab") as f:
        f.write(b"more")
    with pytest.raises(FileExistsError, match="1 changed in size: 0002-of-2160.tfrecord"):
        convert_deepmind(src, out, "rooms_ring_camera", splits=("train",), progress=False)
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before  # untouched


class Killed(BaseException):
    """Stands for a kill: no `except Exception` catches it."""


# Every step of a conversion that writes or removes something.
STEPS = [
    (deepmind.NpyAppender, "append"),
    (deepmind.NpyAppender, "close"),
    (deepmind.SplitWriter, "__init__"),
    (deepmind.SplitWriter, "write"),
    (deepmind.SplitWriter, "flush"),
    (deepmind.SplitWriter, "finish"),
    (deepmind, "write_json_atomic"),
    (deepmind, "_remove"),
    (deepmind, "_replace"),
]


def _kill_at(monkeypatch, point):
    """Raise Killed just before or just after a step: points 1, 2 are before and after the first
    call of any step, 3, 4 the second, ...; returns the count of points reached."""
    reached = [0]
    for owner, name in STEPS:

        def step(*args, _real=getattr(owner, name), **kwargs):  # noqa: B008  (bind this step's function)
            reached[0] += 1
            if reached[0] == point:
                raise Killed
            result = _real(*args, **kwargs)
            reached[0] += 1
            if reached[0] == point:
                raise Killed
            return result

        monkeypatch.setattr(owner, name, step)
    return reached


def _snapshot(out):
    """Every file under OUT with its bytes, the manifests parsed."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            key = str(path.relative_to(out))
            files[key] = json.loads(path.read_text()) if path.name == "manifest.json" else path.read_bytes()
    return files


def test_an_interrupt_at_any_step_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [1, 2], seed=14)
    write_dataset(src, "rooms_ring_camera", "test", [1], seed=15)
    bad = src / "rooms_ring_camera" / "train" / "0002-of-2160.tfrecord"
    _corrupt_payload(bad, 0, bad.stat().st_size // 2)  # a skipped record is part of what must come out the same
    convert = lambda out: convert_deepmind(src, out, "rooms_ring_camera", workers=1, skip_corrupt=True, progress=False)
    # fsync and msync guard against power loss, not kills (the page cache outlives a process); and are slow.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(np.memmap, "flush", lambda self: None)
    with monkeypatch.context() as m:
        points = _kill_at(m, point=0)
        convert(tmp_path / "clean")
    clean = _snapshot(tmp_path / "clean")
    assert set(clean) == {f"{s}/{f}" for s in ("train", "test") for f in ("images.npy", "cameras.npy", "manifest.json")}
    assert points[0] > 40, points[0]
    for point in range(1, points[0] + 1):
        out = tmp_path / f"killed-{point}"
        with monkeypatch.context() as m:
            _kill_at(m, point)
            with pytest.raises(Killed):
                convert(out)
        for split in ("train", "test"):  # a manifest only ever stands beside the right data
            if (out / split / "manifest.json").exists():
                got = SceneDataset(out, split)
                assert got.manifest == clean[f"{split}/manifest.json"], point
                np.testing.assert_array_equal(
                    np.load(out / split / "images.npy"), np.load(tmp_path / "clean" / split / "images.npy")
                )
        convert(out)
        assert _snapshot(out) == clean, f"killed at point {point}"


def _children(pid):
    try:
        import psutil
    except ImportError:
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended meanwhile
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
        return children
    return [p.pid for p in psutil.Process(pid).children()]


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is missing


SLOW_CONVERSION = """
import sys, time
import gqn_fast.data.deepmind as deepmind
real = deepmind.decode_scene
deepmind.decode_scene = lambda *args: time.sleep(0.5) or real(*args)  # inherited by the forked workers
deepmind.convert_deepmind(sys.argv[1], sys.argv[2], "rooms_ring_camera", workers=2, progress=False)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc (Linux)")
def test_killing_the_converter_stops_its_workers(tmp_path):
    src = tmp_path / "src"
    write_dataset(src, "rooms_ring_camera", "train", [2, 2, 2, 2], seed=16)
    write_dataset(src, "rooms_ring_camera", "test", [1], seed=17)
    parent = subprocess.Popen([sys.executable, "-c", SLOW_CONVERSION, str(src), str(tmp_path / "out")])
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 2, "the conversion never started its 2 workers"
        time.sleep(1.5)  # some parts done, others half written
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "the workers outlived their killed parent"
    # And what the killed run left resumes to the same bytes as a clean run.
    convert_deepmind(src, tmp_path / "out", "rooms_ring_camera", workers=1, progress=False)
    convert_deepmind(src, tmp_path / "clean", "rooms_ring_camera", workers=1, progress=False)
    assert _snapshot(tmp_path / "out") == _snapshot(tmp_path / "clean")


SLOW_COMMAND = """
import sys, time
import gqn_fast.data.deepmind as deepmind
from gqn_fast.cli import main
real = deepmind.decode_scene
deepmind.decode_scene = lambda *args: time.sleep(0.5) or real(*args)  # inherited by the forked workers
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc (Linux)")
def test_ctrl_c_stops_the_converter_in_one_line_and_a_rerun_resumes(tmp_path):
    """Ctrl-C to the converter and its workers (a terminal's process group): one line saying what
    was kept, exit 130, no worker's traceback or process left, and the same command finishes
    to the bytes of a clean run."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_dataset(src, "rooms_ring_camera", "train", [2, 2, 2, 2], seed=16)
    write_dataset(src, "rooms_ring_camera", "test", [1], seed=17)
    argv = ["data", "convert-deepmind", str(src), str(out), "--dataset", "rooms_ring_camera", "--workers", "2"]
    started = []

    def working(process):
        if not started and len(_children(process.pid)) >= 2:
            started.append(time.monotonic())
        return started and time.monotonic() > started[0] + 1.5  # some files done, others half written

    code, stdout, err = interrupt_when([sys.executable, "-c", SLOW_COMMAND, *argv, "--quiet"], working)
    assert (code, stdout) == (130, "")
    line = err.strip()
    assert "\n" not in line and line.startswith("gqn-fast data convert-deepmind: interrupted: the files converted"), err
    assert line.endswith(f"in this run) are kept in {out}, each whole; the same command resumes"), err
    assert main([*argv, "--quiet"]) == 0
    convert_deepmind(src, tmp_path / "clean", "rooms_ring_camera", workers=1, progress=False)
    assert _snapshot(out) == _snapshot(tmp_path / "clean")
