"""Checks on the tensors a GQN is called with, shared by the reference and the fast model."""

from __future__ import annotations

import contextlib

import torch

from gqn_fast.config import IMAGE_SIZE, VIEWPOINT_DIM


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t, ndim: int, tail: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != ndim or tuple(t.shape[ndim - len(tail) :]) != tail:
        raise ValueError(f"{name}: expected shape {what}, got {_shape(t)}")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> None:
    # Under autocast the inputs and parameters stay in the model's dtype; autocast converts inside.
    if dtype is not None and t.dtype != dtype:
        raise TypeError(
            f"{name}: expected the model's dtype {dtype}, got {t.dtype} "
            f"(convert the inputs with .to({dtype}), or the model with .to({t.dtype}))"
        )


_values_trusted = False


@contextlib.contextmanager
def values_trusted():
    """Inside this block the models skip the checks of their inputs' values (NaN and inf, images
    outside [0, 1]); shapes, dtypes and devices are still checked. For loops whose data is valid
    by construction, as gqn_fast.data's batches are (uint8 images scaled to [0, 1], cameras
    checked finite when the dataset is opened): each value check reads a result back to the host,
    which on a GPU waits for all the work queued before it, 6 reads a training step, so the host
    could never run ahead of the GPU. `gqn-fast train` runs its steps inside it."""
    global _values_trusted
    previous, _values_trusted = _values_trusted, True
    try:
        yield
    finally:
        _values_trusted = previous


def _check_values(name: str, t: torch.Tensor, unit_range: bool) -> None:
    # Value checks read the tensor back to the host; under torch.compile they would break the
    # graph and in CUDA-graph capture they are illegal, so they run in eager mode only (shapes
    # are checked either way), and not at all inside values_trusted().
    if _values_trusted or torch.compiler.is_compiling() or t.is_meta:  # a meta tensor has shapes, not values
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if unit_range:
        # One pass over the images: NaN makes min and max NaN, which fails both comparisons.
        lo, hi = (float(x) for x in torch.aminmax(t))
        if lo >= 0 and hi <= 1:
            return
    elif bool(torch.isfinite(t).all()):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    raise ValueError(f"{name}: expected values in [0, 1], got a range [{lo:.4g}, {hi:.4g}]")


def check_context(context_x, context_v, dtype: torch.dtype | None = None) -> None:
    """context_x [B, M, 3, 64, 64] in [0, 1] and context_v [B, M, 7], B >= 1, M >= 1, both of
    `dtype` (the model's) when given."""
    s = IMAGE_SIZE
    _check_tensor("context_x", context_x, 5, (3, s, s), f"[B, M, 3, {s}, {s}]")
    _check_tensor("context_v", context_v, 3, (VIEWPOINT_DIM,), f"[B, M, {VIEWPOINT_DIM}]")
    _check_dtype("context_x", context_x, dtype)
    _check_dtype("context_v", context_v, dtype)
    if context_x.shape[0] == 0:
        raise ValueError("context_x: expected a batch of at least one scene (B >= 1), got B = 0")
    if context_x.shape[1] == 0:
        raise ValueError("context_x: expected at least one context view (M >= 1), got M = 0")
    if context_x.shape[:2] != context_v.shape[:2]:
        raise ValueError(
            f"context_v: expected [B, M] = {list(context_x.shape[:2])} as in context_x, got {list(context_v.shape[:2])}"
        )
    if context_v.device != context_x.device:
        raise ValueError(f"context_v: expected device {context_x.device} as context_x, got {context_v.device}")
    _check_values("context_x", context_x, unit_range=True)
    _check_values("context_v", context_v, unit_range=False)


def check_query(context_x, query_v, query_x=None, dtype: torch.dtype | None = None) -> None:
    """query_v [B, 7] and, when given, query_x [B, 3, 64, 64] in [0, 1], B as in the context,
    of `dtype` (the model's) when given."""
    s = IMAGE_SIZE
    batch = context_x.shape[0]
    _check_tensor("query_v", query_v, 2, (VIEWPOINT_DIM,), f"[B, {VIEWPOINT_DIM}]")
    pairs = [("query_v", query_v)]
    if query_x is not None:
        _check_tensor("query_x", query_x, 4, (3, s, s), f"[B, 3, {s}, {s}]")
        pairs.append(("query_x", query_x))
    for name, t in pairs:
        _check_dtype(name, t, dtype)
        if t.shape[0] != batch:
            raise ValueError(f"{name}: expected batch size {batch} as in context_x, got {t.shape[0]}")
        if t.device != context_x.device:
            raise ValueError(f"{name}: expected device {context_x.device}, got {t.device}")
    _check_values("query_v", query_v, unit_range=False)
    if query_x is not None:
        _check_values("query_x", query_x, unit_range=True)


def check_noise(noise, L: int, batch: int, z_dim: int, grid: int, dtype: torch.dtype | None = None) -> None:
    """noise [L, B, z_dim, 16, 16] of standard-normal draws, one slice per step, of `dtype`
    (the model's) when given."""
    if noise is None:
        return
    expected = (L, batch, z_dim, grid, grid)
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    _check_dtype("noise", noise, dtype)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise: expected shape {list(expected)}, got {_shape(noise)}")
    _check_values("noise", noise, unit_range=False)


def check_sigma(sigma) -> None:
    value = float(sigma) if not isinstance(sigma, torch.Tensor) else None
    if value is not None and not value > 0:
        raise ValueError(f"sigma: expected a positive pixel standard deviation, got {sigma!r}")


def check_representation(r, query_v, r_dim: int, grid: int, vector: bool, dtype: torch.dtype | None = None) -> None:
    """r for query_v [B, 7], of `dtype` (the model's) when given: [B, r_dim, grid, grid] (the
    tower's map) or, when `vector` (pool, pyramid: one vector per scene), [B, r_dim, 1, 1] or that
    vector tiled to [B, r_dim, grid, grid] as `represent` returns it."""
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"r: expected a torch.Tensor, got {type(r).__name__}")
    _check_tensor("query_v", query_v, 2, (VIEWPOINT_DIM,), f"[B, {VIEWPOINT_DIM}]")
    sizes = {(grid, grid), (1, 1)} if vector else {(grid, grid)}
    if r.dim() != 4 or r.shape[1] != r_dim or tuple(r.shape[2:]) not in sizes:
        expected = f"[B, {r_dim}, {grid}, {grid}]" + (f" or [B, {r_dim}, 1, 1]" if vector else "")
        raise ValueError(f"r: expected shape {expected}, got {_shape(r)}")
    _check_dtype("r", r, dtype)
    _check_dtype("query_v", query_v, dtype)
    if r.shape[0] != query_v.shape[0]:
        raise ValueError(f"query_v: expected batch size {r.shape[0]} as in r, got {query_v.shape[0]}")
    if r.device != query_v.device:
        raise ValueError(f"query_v: expected device {r.device} as r, got {query_v.device}")
    _check_values("r", r, unit_range=False)
    _check_values("query_v", query_v, unit_range=False)
    if vector and not torch.compiler.is_compiling() and not torch.equal(r, r[:, :, :1, :1].expand_as(r)):
        raise ValueError(
            "r: expected one vector per scene, tiled (pool and pyramid); got one that varies over the grid"
        )


def check_targets(context_x, query_v, query_x=None, dtype: torch.dtype | None = None) -> None:
    """One query per scene as check_query takes it (query_v [B, 7], query_x [B, 3, 64, 64]), or a
    set of K per scene (query_v [B, K, 7], query_x [B, K, 3, 64, 64]), as Consistent GQN reads
    them; B as in the context, of `dtype` (the model's) when given."""
    if not isinstance(query_v, torch.Tensor) or query_v.dim() != 3:
        check_query(context_x, query_v, query_x, dtype)
        return
    s = IMAGE_SIZE
    _check_tensor("query_v", query_v, 3, (VIEWPOINT_DIM,), f"[B, {VIEWPOINT_DIM}] or [B, K, {VIEWPOINT_DIM}]")
    if query_v.shape[1] == 0:
        raise ValueError("query_v: expected at least one target view per scene (K >= 1), got K = 0")
    if query_x is not None:
        _check_tensor("query_x", query_x, 5, (3, s, s), f"[B, K, 3, {s}, {s}] as query_v is [B, K, 7]")
        if query_x.shape[:2] != query_v.shape[:2]:
            raise ValueError(
                f"query_x: expected [B, K] = {list(query_v.shape[:2])} as in query_v, got {list(query_x.shape[:2])}"
            )
    # The per-scene checks (dtype, batch size, device, values) are check_query's, on views of one target.
    check_query(context_x, query_v[:, 0], None if query_x is None else query_x[:, 0], dtype)
    _check_values("query_v", query_v, unit_range=False)
    if query_x is not None:
        _check_values("query_x", query_x, unit_range=True)
