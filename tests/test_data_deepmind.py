"""Reading DeepMind's gqn-datasets without TensorFlow: TFRecord framing, tf.train.Example, the converter.

The TFRecord files are written here, independently of gqn_fast's reader: a bit-by-bit
CRC32C, the masked-CRC framing and a hand-written protobuf encoder, in DeepMind's layout
(`frames`: T JPEG strings, `cameras`: T * 5 floats; files <dataset>/<split>/0001-of-0002.tfrecord).
"""

import io
import struct

import numpy as np
import pytest
from PIL import Image

import gqn_fast.data.deepmind as deepmind
from gqn_fast.cli import main
from gqn_fast.data import CorruptRecordError, SceneDataset
from gqn_fast.data.deepmind import DEEPMIND_DATASETS, convert_deepmind
from gqn_fast.data.tfrecord import crc32c, masked_crc32c, parse_example, read_records

# ---------------------------------------------------------------------------------------
# An independent TFRecord writer


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


_crc_cache = {}


def masked(data: bytes) -> int:
    if data not in _crc_cache:  # identical records are common in these tests; the bitwise CRC is slow
        crc = crc32c_bitwise(data)
        _crc_cache[data] = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return _crc_cache[data]


def frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked(length)) + data + struct.pack("<I", masked(data))


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def example(features: dict) -> bytes:
    """tf.train.Example from {name: list of bytes | float32 array (packed) | ("unpacked", floats) | ("int64", ints)}."""
    entries = b""
    for name, value in features.items():
        if isinstance(value, list):
            feature = field(1, b"".join(field(1, v) for v in value))
        elif isinstance(value, tuple) and value[0] == "unpacked":
            feature = field(2, b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in value[1]))
        elif isinstance(value, tuple) and value[0] == "int64":
            feature = field(3, field(1, b"".join(varint(v) for v in value[1])))
        else:
            feature = field(2, field(1, np.asarray(value, "<f4").tobytes()))
        entries += field(1, field(1, name.encode()) + field(2, feature))
    return field(1, entries)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def smooth_images(rng, count, size):
    """Smooth colour fields: JPEG keeps them to within a few levels."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        a = rng.uniform(0, 1, (3, 3))
        image = a[:, 0, None, None] * 0.5 + a[:, 1, None, None] * 0.3 * xx + a[:, 2, None, None] * 0.2 * yy
        out.append((np.moveaxis(image, 0, -1) * 255).round().astype(np.uint8))
    return np.stack(out)


def write_dataset(src, name, split, scenes_per_file, seed=0):
    """Write <src>/<name>/<split>/NNNN-of-NNNN.tfrecord; returns the scenes [(images, cameras)] in order."""
    info = DEEPMIND_DATASETS[name]
    folder = src / name / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes, n = [], len(scenes_per_file)
    for i, count in enumerate(scenes_per_file):
        with open(folder / f"{i + 1:04d}-of-{n:04d}.tfrecord", "wb") as f:
            for _ in range(count):
                images = smooth_images(rng, info.num_views, info.image_size)
                cameras = rng.uniform(-3, 3, (info.num_views, 5)).astype(np.float32)
                f.write(frame_record(example({"frames": [jpeg(x) for x in images], "cameras": cameras.ravel()})))
                scenes.append((images, cameras))
    return scenes


def downsample(images, size=64):
    """The box filter the converter uses, applied to the original (not the JPEG) frames."""
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BOX)) for x in images])


def assert_within_jpeg_error(got, expected):
    error = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert error.mean() < 2.0 and error.max() <= 24, (error.mean(), error.max())


# ---------------------------------------------------------------------------------------


def test_crc32c_and_its_mask():
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"123456789") == 0xE3069283
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert crc32c(data) == crc32c_bitwise(data)
        assert masked_crc32c(data) == masked(data)


def test_parse_example_reads_every_list_type():
    features = parse_example(example({
        "frames": [b"\xff\xd8one", b"two"],
        "cameras": np.array([1.5, -2.25, 3.0], np.float32),
        "loose": ("unpacked", [0.5, -1.0]),
        "ids": ("int64", [3, -7, 2**40]),
    }))
    assert features["frames"] == [b"\xff\xd8one", b"two"]
    np.testing.assert_array_equal(features["cameras"], [1.5, -2.25, 3.0])
    assert features["cameras"].dtype == np.float32
    np.testing.assert_array_equal(features["loose"], [0.5, -1.0])
    np.testing.assert_array_equal(features["ids"], [3, -7, 2**40])
    with pytest.raises(ValueError):
        parse_example(b"\x0a\x05ab")  # a field longer than the message


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


def test_convert_round_trip_64px_through_the_cli(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    train = write_dataset(src, "rooms_ring_camera", "train", [3, 2], seed=1)
    test = write_dataset(src, "rooms_ring_camera", "test", [2], seed=2)
    code = main(["data", "convert-deepmind", str(src), str(out), "--dataset", "rooms_ring_camera",
                 "--quiet", "--workers", "2"])
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
    convert_deepmind(src, tmp_path / "rooms128", "rooms_free_camera_with_object_rotations", workers=1,
                     progress=False)
    ds = SceneDataset(tmp_path / "rooms128", "train")
    for i, (images, cameras) in enumerate(scenes):
        assert ds[i][0].shape == (10, 64, 64, 3)
        assert_within_jpeg_error(ds[i][0].numpy(), downsample(images))
        np.testing.assert_array_equal(ds[i][1].numpy(), cameras)
    # mazes: 84 px, T = 300; SRC may also be the dataset's own folder.
    mazes = write_dataset(src, "mazes", "test", [1], seed=5)
    convert_deepmind(src / "mazes", tmp_path / "mazes", "mazes", splits=("test",), progress=False)
    ds = SceneDataset(tmp_path / "mazes", "test")
    assert ds.num_views == 300
    assert_within_jpeg_error(ds[0][0].numpy(), downsample(mazes[0][0]))


def test_files_of_20_and_of_2000_scenes(tmp_path):
    """Record files of both sizes DeepMind ships, converted in parallel; identical records reuse
    their JPEGs so the test stays fast."""
    rng = np.random.default_rng(6)
    variants = []
    for _ in range(3):
        images = smooth_images(rng, 10, 64)
        cameras = rng.uniform(-3, 3, (10, 5)).astype(np.float32)
        variants.append((frame_record(example({"frames": [jpeg(x) for x in images], "cameras": cameras.ravel()})),
                         cameras))
    src = tmp_path / "src" / "rooms_ring_camera"
    for split, counts in (("train", [2000, 20]), ("test", [20])):
        (src / split).mkdir(parents=True)
        for i, count in enumerate(counts):
            with open(src / split / f"{i + 1:04d}-of-{len(counts):04d}.tfrecord", "wb") as f:
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
    bad = src / "shepard_metzler_5_parts" / "train" / "0002-of-0003.tfrecord"
    _truncate_last_record(bad)

    converted = []
    real = deepmind.convert_file
    monkeypatch.setattr(deepmind, "convert_file", lambda source, *a: converted.append(source.name) or real(source, *a))

    # Without --skip-corrupt: an error naming the file and the record; the good files are kept.
    with pytest.raises(CorruptRecordError) as caught:
        convert_deepmind(src, out, "shepard_metzler_5_parts", workers=1, progress=False)
    assert caught.value.path == str(bad) and caught.value.index == 2 and "truncated" in str(caught.value)
    assert (out / "train" / ".parts" / "0001-of-0003.tfrecord.done.json").is_file()
    assert not (out / "train" / "manifest.json").exists()

    # Run again, skipping: only the unfinished files are converted.
    converted.clear()
    code = main(["data", "convert-deepmind", str(src), str(out), "--dataset", "shepard_metzler_5_parts",
                 "--skip-corrupt", "--quiet", "--workers", "1"])
    assert code == 0
    assert "0001-of-0003.tfrecord" not in converted and "0002-of-0003.tfrecord" in converted
    assert "skipped 0002-of-0003.tfrecord record 2: truncated" in capsys.readouterr().out
    ds = SceneDataset(out, "train")
    assert len(ds) == 6  # 2 + 2 readable of 3 + 2
    kept = scenes[:2] + scenes[2:4] + scenes[5:]
    for i, (_, cameras) in enumerate(kept):
        np.testing.assert_array_equal(ds[i][1].numpy(), cameras)
    skipped = ds.manifest["deepmind"]["skipped_records"]
    assert [s[:2] for s in skipped] == [["0002-of-0003.tfrecord", 2]]

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
    good = example({"frames": [jpeg(x) for x in smooth_images(np.random.default_rng(0), 11, 64)],
                    "cameras": np.zeros(55, np.float32)})
    few_frames = example({"frames": [jpeg(np.zeros((64, 64, 3), np.uint8))] * 3, "cameras": np.zeros(55, np.float32)})
    not_jpeg = example({"frames": [b"not a jpeg"] * 11, "cameras": np.zeros(55, np.float32)})
    (src / "0001-of-0001.tfrecord").write_bytes(b"".join(frame_record(r) for r in (good, few_frames, not_jpeg)))
    with pytest.raises(CorruptRecordError, match=r"record 1: 'frames': expected 11 JPEG strings, got 3"):
        convert_deepmind(tmp_path / "src", tmp_path / "out", "jaco", splits=("train",), progress=False)
    assert main(["data", "convert-deepmind", str(tmp_path / "src"), str(tmp_path / "out"), "--dataset", "jaco",
                 "--splits", "train", "--quiet"]) == 1
    assert "0001-of-0001.tfrecord: record 1" in capsys.readouterr().err
    report = convert_deepmind(tmp_path / "src", tmp_path / "out", "jaco", splits=("train",), skip_corrupt=True,
                              progress=False)
    assert report["train"]["scenes"] == 1
    assert [s[1] for s in report["train"]["skipped"]] == [1, 2]
    assert "frame 0: not a decodable image" in report["train"]["skipped"][1][2]
    with pytest.raises(FileNotFoundError, match="test"):
        convert_deepmind(tmp_path / "src", tmp_path / "out2", "jaco", progress=False)


def test_every_deepmind_dataset_is_known():
    sizes = {name: (d.num_views, d.image_size) for name, d in DEEPMIND_DATASETS.items()}
    assert sizes == {
        "rooms_ring_camera": (10, 64),
        "rooms_free_camera_no_object_rotations": (10, 64),
        "rooms_free_camera_with_object_rotations": (10, 128),
        "jaco": (11, 64),
        "shepard_metzler_5_parts": (15, 64),
        "shepard_metzler_7_parts": (15, 64),
        "mazes": (300, 84),
    }
    with pytest.raises(ValueError, match="dataset"):
        convert_deepmind(".", ".", "rooms")
