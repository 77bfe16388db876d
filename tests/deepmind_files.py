"""TFRecord files as DeepMind's gqn-datasets hold them, written independently of gqn_fast's reader.

A table-driven CRC32C, the masked-CRC framing and a hand-written protobuf encoder, in DeepMind's
layout (`frames`: T JPEG strings, `cameras`: T * 5 floats), under the file names DeepMind's own
reader (data_reader.py in deepmind/gqn-datasets) opens. Used by tests/test_data_deepmind.py and
by bench/data_bench.py, so the bench converts the files the tests hold the converter to.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# Record files per split, (train, test), as data_reader.py's _DATASETS lists them.
RELEASE_FILES = {
    "jaco": (3600, 400),
    "mazes": (1080, 120),
    "rooms_free_camera_with_object_rotations": (2034, 226),
    "rooms_ring_camera": (2160, 240),
    "rooms_free_camera_no_object_rotations": (2160, 240),
    "shepard_metzler_5_parts": (900, 100),
    "shepard_metzler_7_parts": (900, 100),
}
# (views per scene, frame size): data_reader.py's sequence_size and frame_size.
RELEASE_FRAMES = {
    "jaco": (11, 64),
    "mazes": (300, 84),
    "rooms_free_camera_with_object_rotations": (10, 128),
    "rooms_ring_camera": (10, 64),
    "rooms_free_camera_no_object_rotations": (10, 64),
    "shepard_metzler_5_parts": (15, 64),
    "shepard_metzler_7_parts": (15, 64),
}


def deepmind_file_name(index: int, count: int) -> str:
    """data_reader.py's template for file `index` (from 1) of `count`, written as it writes it."""
    length = len(str(count))
    template = "{:0%d}-of-{:0%d}.tfrecord" % (length, length)  # noqa: UP031  (as DeepMind writes it)
    return template.format(index, count)


def file_name(dataset: str, split: str, index: int) -> str:
    """The name of file `index` (from 1) of a split of `dataset`, as DeepMind ships it."""
    train, test = RELEASE_FILES[dataset]
    return deepmind_file_name(index, train if split == "train" else test)


# ---------------------------------------------------------------------------------------
# CRC32C (Castagnoli, reflected polynomial 0x82F63B78) and the TFRecord framing


def crc32c_bitwise(data: bytes) -> int:
    """The definition, one bit at a time: the oracle of the table below."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _table()


def crc32c_table(data: bytes) -> int:
    """One table lookup per byte: eight times fewer Python steps than the bitwise definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_crc_cache = {}


def masked(data: bytes) -> int:
    if data not in _crc_cache:  # identical records are common in the tests and the bench
        crc = crc32c_table(data)
        _crc_cache[data] = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return _crc_cache[data]


def frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked(length)) + data + struct.pack("<I", masked(data))


# ---------------------------------------------------------------------------------------
# tf.train.Example in the protobuf wire format


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


def scene_record(jpegs: list[bytes], cameras: np.ndarray) -> bytes:
    """One framed record of a scene: its frames' JPEGs and its cameras [T, 5]."""
    return frame_record(example({"frames": jpegs, "cameras": np.asarray(cameras, np.float32).ravel()}))


# ---------------------------------------------------------------------------------------
# Frames


def jpeg(image: np.ndarray, **options) -> bytes:
    """JPEG bytes of an RGB (or grey) uint8 image; PIL's options (quality 95 unless given)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", **{"quality": 95, **options})
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


def write_dataset(src, name, split, scenes_per_file, seed=0, numbers=None):
    """Write <src>/<name>/<split>/<DeepMind's file names>, file k holding scenes_per_file[k] scenes;
    `numbers` are the files' numbers in the release (default 1, 2, ...: a partial download).
    Returns the scenes [(images, cameras)] in file order."""
    views, size = RELEASE_FRAMES[name]
    folder = Path(src) / name / split
    folder.mkdir(parents=True, exist_ok=True)
    numbers = numbers or range(1, len(scenes_per_file) + 1)
    rng = np.random.default_rng(seed)
    scenes = []
    for number, count in zip(numbers, scenes_per_file, strict=True):
        with open(folder / file_name(name, split, number), "wb") as f:
            for _ in range(count):
                images = smooth_images(rng, views, size)
                cameras = rng.uniform(-3, 3, (views, 5)).astype(np.float32)
                f.write(scene_record([jpeg(x) for x in images], cameras))
                scenes.append((images, cameras))
    return scenes
