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
from collections.abc import Iterator, Sequence
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
# Protobuf wire format, the subset tf.train.Example uses. Every level is read in place, as
# (start, end) spans of the one bytes object: nothing is copied until a value is asked for.


class ByteStrings(Sequence):
    """A BytesList's values, located in the Example's bytes and copied out only when read: a
    training batch decodes 6 of a scene's 15 (or 300) frames. Equal to the list of its values."""

    __slots__ = ("_data", "_starts", "_ends")

    def __init__(self, data: bytes, starts: list[int], ends: list[int]):
        self._data, self._starts, self._ends = data, starts, ends

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._data[self._starts[index] : self._ends[index]]

    def __eq__(self, other):
        if isinstance(other, (ByteStrings, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # a sequence compared by value

    def __repr__(self) -> str:
        return f"ByteStrings({len(self)} values)"


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise ValueError("truncated varint")
    byte = buf[pos]
    if byte < 0x80:  # keys and small sizes: one byte
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    pos += 1
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


_FIXED_SIZE = {1: 8, 5: 4}


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, value) of the message buf[pos:end]: an int for a varint, the
    (start, end) of its bytes in buf for the other wire types."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
            continue
        if wire == 2:
            size, pos = _varint(buf, pos, end)
        elif wire in _FIXED_SIZE:
            size = _FIXED_SIZE[wire]
        else:
            raise ValueError(f"field {number}: unsupported wire type {wire}")
        if pos + size > end:
            raise ValueError(f"field {number}: {size} bytes announced, {end - pos} left")
        yield number, wire, (pos, pos + size)
        pos += size


def _bytes_list(buf: bytes, pos: int, end: int) -> ByteStrings:
    """The BytesList buf[pos:end] -> its values, located in one tight loop (a generator per value
    costs several times the rest of a scene's parse)."""
    first, starts, ends = pos, [], []
    while pos < end:
        if buf[pos] != 1 << 3 | 2:  # not a value's key: another field, read the general way
            spans = [v for n, w, v in _fields(buf, first, end) if n == 1 and w == 2]
            return ByteStrings(buf, [s for s, _ in spans], [e for _, e in spans])
        # The size, a varint: one or two bytes inline (a frame under 16 KiB), else the general way.
        size = buf[pos + 1] if pos + 1 < end else 0x80
        if size < 0x80:
            pos += 2
        elif pos + 2 < end and buf[pos + 2] < 0x80:
            size, pos = (size & 0x7F) | buf[pos + 2] << 7, pos + 3
        else:
            size, pos = _varint(buf, pos + 1, end)
        if pos + size > end:
            raise ValueError(f"field 1: {size} bytes announced, {end - pos} left")
        starts.append(pos)
        pos += size
        ends.append(pos)
    return ByteStrings(buf, starts, ends)


def _floats(buf: bytes, start: int, end: int) -> np.ndarray:
    if (end - start) % 4:
        raise ValueError(f"float_list: {end - start} bytes, not a whole number of floats")
    return np.frombuffer(buf, "<f4", count=(end - start) // 4, offset=start)


def _feature(buf: bytes, pos: int, end: int):
    """The Feature buf[pos:end] -> ByteStrings (bytes_list), a float32 array (float_list) or an
    int64 array (int64_list)."""
    for number, wire, body in _fields(buf, pos, end):
        if wire != 2:
            continue
        if number == 1:
            return _bytes_list(buf, *body)
        if number == 2:
            parts = []
            for n, w, v in _fields(buf, *body):
                if n == 1:
                    if w not in (2, 5):
                        raise ValueError("float_list: unexpected wire type")
                    parts.append(_floats(buf, *v))
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        if number == 3:
            values = []
            for n, w, v in _fields(buf, *body):
                if n != 1:
                    continue
                if w == 0:
                    values.append(v)
                elif w == 2:  # packed
                    at, stop = v
                    while at < stop:
                        x, at = _varint(buf, at, stop)
                        values.append(x)
            # int64 travels as its two's complement in 64 bits
            return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in values], dtype=np.int64)
    return ByteStrings(buf, [], [])  # an empty Feature


def parse_example(data: bytes) -> dict:
    """A serialized tf.train.Example -> {name: ByteStrings | float32 array | int64 array}.

    Raises ValueError when the bytes are not a well-formed Example."""
    buf = data if isinstance(data, bytes) else bytes(data)
    features = {}
    for number, wire, body in _fields(buf, 0, len(buf)):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(buf, *body):
            if n != 1 or w != 2:
                continue
            key, value = None, (0, 0)
            for en, ew, ev in _fields(buf, *entry):
                if en == 1 and ew == 2:
                    key = buf[ev[0] : ev[1]].decode("utf-8")
                elif en == 2 and ew == 2:
                    value = ev
            if key is None:
                raise ValueError("a feature map entry without a key")
            features[key] = _feature(buf, *value)
    return features
