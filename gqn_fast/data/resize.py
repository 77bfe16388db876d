"""Area resize of uint8 images: each output pixel is the mean of the input it covers.

Shrinking a side of `a` pixels to `b`, output pixel i covers [i * a / b, (i + 1) * a / b) of
the input; an input pixel partly covered counts with the covered fraction of its area.
Measured in units of b / a * gcd(a, b) the weights are small integers (0..16 for 84 -> 64, each
row summing to 21; 1 for 128 -> 64, summing to 2), so the weighted sums are exact integers and
the mean is rounded once, half up: the result is the float64 area mean rounded, bit for bit
the same on every machine. A whole-pixel box filter (PIL's BOX) aliases when a / b is no
integer, and PIL's BOX rounds after each axis.
"""

from __future__ import annotations

from functools import cache
from math import gcd

import numpy as np


@cache
def area_weights(a: int, b: int) -> np.ndarray:
    """Integer weights [b, a] of the area resize of a side of `a` pixels to `b`; rows sum to a / gcd(a, b)."""
    if not 0 < b <= a:
        raise ValueError(f"area_weights: expected 0 < b <= a, got a={a}, b={b}")
    g = gcd(a, b)
    weights = np.zeros((b, a), np.int64)
    for i in range(b):
        # Scaled by b: output pixel i is [i * a, (i + 1) * a), input pixel j is [j * b, (j + 1) * b).
        for j in range(i * a // b, min(a, ((i + 1) * a + b - 1) // b)):
            weights[i, j] = min((i + 1) * a, (j + 1) * b) - max(i * a, j * b)
    return weights // g


def area_resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [..., H, H, C] -> uint8 [..., size, size, C] (square images, size <= H)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim < 3:
        raise TypeError(f"images: expected a uint8 array [..., H, H, C], got {getattr(images, 'dtype', type(images))}")
    a = images.shape[-2]
    if images.shape[-3] != a:
        raise ValueError(f"images: expected square images, got {images.shape[-3]}x{a}")
    if not 0 < size <= a:
        raise ValueError(f"size: expected 1..{a}, got {size}")
    lead, channels = images.shape[:-3], images.shape[-1]
    x = images.reshape(-1, a, a, channels)
    out = np.empty((x.shape[0], size, size, channels), np.uint8)
    chunk = 16  # images at a time: the float intermediates stay in cache
    for i in range(0, x.shape[0], chunk):
        out[i : i + chunk] = _area_resize(x[i : i + chunk], size)
    return out.reshape(*lead, size, size, channels)


@cache
def _block_weights(a: int, b: int, channels: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The repeating [q, p] block of area_weights(a, b), and its transpose spread over the
    channels, [p * C, q * C], for the fractional resize's two products."""
    g = gcd(a, b)
    block = area_weights(a, b)[: b // g, : a // g].astype(dtype)
    return block, np.kron(block.T, np.eye(channels, dtype=dtype))


def _area_resize(x: np.ndarray, size: int) -> np.ndarray:
    n, a, _, channels = x.shape
    if a % size == 0:
        # Integer factor f: sums of f rows, then of f columns, in integers.
        f = a // size
        d = f * f
        dtype = np.uint16 if 2 * 255 * d + d < 2**16 else np.uint32
        rows = x.reshape(n, size, f, size, f * channels)  # the f rows of each output row, side by side
        total = np.add(rows[:, :, 0], rows[:, :, 1], dtype=dtype) if f > 1 else rows[:, :, 0].astype(dtype)
        for dy in range(2, f):
            total += rows[:, :, dy]
        cols = total.reshape(n, size, size, f, channels)
        total = np.add(cols[:, :, :, 0], cols[:, :, :, 1]) if f > 1 else cols[:, :, :, 0]
        for dx in range(2, f):
            total += cols[:, :, :, dx]
        if d & (d - 1):
            return (2 * total + d) // (2 * d)  # round half up, once
        total += d // 2  # d a power of two (128 -> 64: 4): the same rounding as a shift, 2x faster
        total >>= d.bit_length() - 1
        return total
    # The weights repeat every block of p = a / g input and q = b / g output pixels: along the
    # rows, one GEMM of every block of p pixels (with their channels) by the block's weights
    # spread over the channels, [p * C, q * C]; down the columns, the [q, p] block times p rows.
    g = gcd(a, size)
    p = a // g
    d = p * p
    # Integer weights and pixels: every sum, and 2 * sum + d, is an integer, exact in float32
    # below 2**24; the division is then correctly rounded, so its floor is the exact one (a
    # quotient that is no integer lies at least 1 / (2 d) from one, far beyond rounding).
    dtype = np.float32 if 2 * 255 * d + d < 2**24 else np.float64
    block, spread = _block_weights(a, size, channels, np.dtype(dtype))
    along = np.matmul(x.reshape(n * a * g, p * channels).astype(dtype), spread)  # [n * a * g, q * C]
    total = np.matmul(block, along.reshape(n, g, p, size * channels))  # [n, g, q, size * C]
    total *= 2
    total += d
    total /= 2 * d
    return np.floor(total, out=total).reshape(n, size, size, channels)
