"""Reading TFRecord files of tf.train.Example without TensorFlow.

A TFRecord file is a sequence of records, each
    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)
(little-endian; masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2**32). Both
checksums are verified; a bad one, or a file that ends inside a record, raises
CorruptRecordError naming the file and the record's index. A payload that fails its checksum
under a sound length leaves the framing intact: `scan_records` reports it and reads on.

Why no library:
- TensorFlow is a 500 MB dependency for a 20-line framing format.
- The record's payload, tf.train.Example, is three nested protobuf messages
  (Example{features=1: Features{feature=1: map<string, Feature>}},
  Feature{bytes_list=1 | float_list=2 | int64_list=3}, each list {value=1: repeated}).
  Decoding that wire format by hand is ~80 lines and spares us protobuf, its generated
  classes and their version pinning.
- CRC32C is the one piece worth a package: `google-crc32c` (Google's, Apache-2.0 like this
  project, wheels with the SSE4.2/ARMv8 instruction for every common platform, a pure-Python
  fallback otherwise) checks GB/s where a Python loop would do a few MB/s and make the
  checksum slower than the JPEG decoding it guards.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from gqn_fast.errors import UserError

try:
    import google_crc32c
except ImportError:  # pragma: no cover - the package is a dependency
    google_crc32c = None

_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(UserError, ValueError):
    """A record of a TFRecord file is truncated, fails its checksum or does not parse."""

    def __init__(self, path, index: int, problem: str):
        self.path, self.index, self.problem = str(path), index, problem
        super().__init__(f"{path}: record {index}: {problem}")

    def __reduce__(self):
        # Rebuilt from its fields when it travels back from a worker process.
        return type(self), (self.path, self.index, self.problem)


def crc32c(data: bytes) -> int:
    if google_crc32c is None:
        raise ImportError("reading TFRecords needs the google-crc32c package: pip install google-crc32c")
    return google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data)


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class Frame(NamedTuple):
    """One record's place in its file: its index, the byte its payload starts at and its length,
    and the payload (bytes) or what is wrong with it (CorruptRecordError)."""

    index: int
    offset: int
    length: int
    data: bytes | CorruptRecordError


def scan_frames(path) -> Iterator[Frame]:
    """Each record of a TFRecord file as a Frame, in order, checksums verified.

    A record whose payload fails its checksum comes with a CorruptRecordError and reading goes
    on: its length held its own checksum, so the next record is where it says. A broken frame
    (truncated file, bad length checksum) comes as the last item: nothing after it can be located.
    """
    path = Path(path)
    with open(path, "rb") as f:
        index = position = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                problem = f"truncated: {len(header)} bytes of a 12-byte header"
                yield Frame(index, position, 0, CorruptRecordError(path, index, problem))
                return
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                problem = f"length checksum mismatch at byte {position}: the records from here on cannot be located"
                yield Frame(index, position, 0, CorruptRecordError(path, index, problem))
                return
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                problem = (
                    f"truncated: {length + 4} bytes of data and checksum expected, "
                    f"{len(data) + len(footer)} left in the file"
                )
                yield Frame(index, position, 0, CorruptRecordError(path, index, problem))
                return
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                data = CorruptRecordError(path, index, "data checksum mismatch")
            yield Frame(index, position + 12, length, data)
            position += 12 + length + 4
            index += 1


def scan_records(path) -> Iterator[tuple[int, bytes | CorruptRecordError]]:
    """(index, payload) for each record of a TFRecord file, in order, checksums verified; a
    damaged record comes as (index, CorruptRecordError), as `scan_frames` says."""
    for frame in scan_frames(path):
        yield frame.index, frame.data


def count_records(path) -> int:
    """Records of a TFRecord file before its end or its first broken frame, from the framing
    alone: each length checked against its checksum, the payloads skipped, not read. As many
    items as `scan_records` yields, but for the broken frame it would yield last."""
    count = position = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while position + 12 <= size:
            f.seek(position)
            header = f.read(12)
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc or position + 12 + length + 4 > size:
                break
            position += 12 + length + 4
            count += 1
    return count


def read_records(path) -> Iterator[bytes]:
    """The payload of each record of a TFRecord file, in order; CorruptRecordError at the first bad one."""
    for _, data in scan_records(path):
        if isinstance(data, CorruptRecordError):
            raise data
        yield data


# ----------------------------------------------------------------------------------------
# Protobuf wire format, the subset tf.train.Example uses.


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise ValueError("truncated varint")
    byte = buf[pos]
    if byte < 0x80:  # keys and small sizes: one byte
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    pos += 1
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value): int for varint / fixed, memoryview for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError(f"field {number}: {size} bytes announced, {len(buf) - pos} left")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"field {number}: unsupported wire type {wire}")
        yield number, wire, value


def _bytes_list(body: memoryview) -> list[bytes]:
    """BytesList -> its values: a scene's frames, read in one tight loop (a generator per field
    costs several times the rest of a scene's parse)."""
    values, pos, end = [], 0, len(body)
    while pos < end:
        if body[pos] != 1 << 3 | 2:  # not a value's key: another field, read the general way
            return [bytes(v) for n, w, v in _fields(body) if n == 1 and w == 2]
        # The size, a varint: one or two bytes inline (a frame under 16 KiB), else the general way.
        first = body[pos + 1] if pos + 1 < end else 0x80
        if first < 0x80:
            size, pos = first, pos + 2
        elif pos + 2 < end and body[pos + 2] < 0x80:
            size, pos = (first & 0x7F) | body[pos + 2] << 7, pos + 3
        else:
            size, pos = _varint(body, pos + 1)
        if pos + size > end:
            raise ValueError(f"field 1: {size} bytes announced, {end - pos} left")
        values.append(bytes(body[pos : pos + size]))
        pos += size
    return values


def _feature(buf: memoryview):
    """Feature -> list[bytes] (bytes_list), float32 array (float_list) or int64 array (int64_list)."""
    for number, wire, body in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            return _bytes_list(body)
        if number == 2:
            parts = []
            for n, w, v in _fields(body):
                if n == 1:
                    parts.append(np.frombuffer(v, dtype="<f4") if w in (2, 5) else None)
            if any(p is None for p in parts):
                raise ValueError("float_list: unexpected wire type")
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        if number == 3:
            values = []
            for n, w, v in _fields(body):
                if n != 1:
                    continue
                if w == 0:
                    values.append(v)
                elif w == 2:  # packed
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        values.append(x)
            # int64 travels as its two's complement in 64 bits
            return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in values], dtype=np.int64)
    return []  # an empty Feature


def parse_example(data: bytes) -> dict:
    """A serialized tf.train.Example -> {name: list[bytes] | float32 array | int64 array}.

    Raises ValueError when the bytes are not a well-formed Example."""
    features = {}
    for number, wire, body in _fields(memoryview(data)):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(body):
            if n != 1 or w != 2:
                continue
            key, value = None, memoryview(b"")
            for en, ew, ev in _fields(entry):
                if en == 1 and ew == 2:
                    key = bytes(ev).decode("utf-8")
                elif en == 2 and ew == 2:
                    value = ev
            if key is None:
                raise ValueError("a feature map entry without a key")
            features[key] = _feature(value)
    return features
