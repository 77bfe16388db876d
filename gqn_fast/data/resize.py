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

from functools import lru_cache
from math import gcd

import numpy as np


@lru_cache(maxsize=None)
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


def _area_resize(x: np.ndarray, size: int) -> np.ndarray:
    n, a, _, channels = x.shape
    if a % size == 0:
        # Integer factor f: the sum of the f * f strided sub-images.
        f = a // size
        total = np.zeros((n, size, size, channels), np.uint32)
        for dy in range(f):
            for dx in range(f):
                total += x[:, dy::f, dx::f]
        d = f * f
    else:
        # The weights repeat every block of p = a / g input and q = b / g output pixels:
        # one small matrix [q, p] applied block by block, first down the rows, then along them.
        g = gcd(a, size)
        p, q = a // g, size // g
        # Integer weights and pixels: every sum is an integer, exact in float32 below 2**24.
        dtype = np.float32 if 255 * p * p < 2**24 else np.float64
        block = area_weights(a, size)[:q, :p].astype(dtype)
        rows = np.matmul(block, x.astype(dtype).reshape(n, g, p, a * channels))  # [n, g, q, a * C]
        rows = rows.reshape(n, size, a, channels).transpose(0, 2, 1, 3).reshape(n, g, p, size * channels)
        total = np.matmul(block, rows).reshape(n, size, size, channels).transpose(0, 2, 1, 3)
        total = total.astype(np.uint32)
        d = p * p
    return (2 * total + d) // (2 * d)  # round half up, once
