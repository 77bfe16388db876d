"""The convolution of a spatially constant input in closed form (docs/spec.md, "Where the speed
comes from"): with the pool and pyramid representations r is 1x1 tiled over the 16x16 grid, and
the viewpoint v_q is always tiled, so their share of each core's 5x5 conv needs no convolution.

Claim. Let x[b, c, y, x'] = v[b, c] at every position of an n x n grid, and W [O, C, K, K] a
kernel applied with stride 1 and zero padding p = K // 2. Then

    conv(x, W)[b, o, y, x'] = sum_{i, j} R[y, i] R[x', j] T[b, o, i, j],
    T[b, o, i, j] = sum_c W[o, c, i, j] v[b, c],    R[y, i] = 1 if 0 <= y + i - p < n else 0.

Proof. By definition conv(x, W)[b, o, y, x'] = sum_{c, i, j} W[o, c, i, j] x_pad[b, c, y+i-p, x'+j-p],
where x_pad is x inside the grid and 0 outside. Inside the grid x is v[b, c], so
x_pad[b, c, y+i-p, x'+j-p] = v[b, c] R[y, i] R[x', j]; the sum over c then gives T, and the
indicator of the tap landing inside the grid factors into its row and column parts. []

R has at most 2p + 1 distinct rows (y < p, y >= n - p, or interior), so the output takes at most
(2p + 1)^2 values per (b, o), 25 border patterns for K = 5. Computing T costs 1/n^2 of the
convolution's multiply-adds (1/256 on the 16x16 grid); placing it is one product with the 0/1
matrix kron(R, R) [n*n, K*K], K^2 multiply-adds per output element.
"""

from __future__ import annotations

import torch


def inside_taps(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """R [n, k]: 1 where tap i of output row y reads a row inside the zero-padded n-row grid."""
    rows = torch.arange(n, device=device)[:, None] + torch.arange(k, device=device)[None, :] - k // 2
    return ((rows >= 0) & (rows < n)).to(dtype)


def _placement(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """kron(R, R) transposed, [k*k, n*n]: 1 where tap t of output position p falls inside the grid."""
    inside = inside_taps(n, k, dtype, device)
    return (inside[:, None, :, None] * inside[None, :, None, :]).reshape(n * n, k * k).T.contiguous()


# Placements already made, per (n, k, dtype, device). A constant, made once: making it costs ten
# small ops, and the paper's unshared cores call constant_conv 25 times a forward. Made fresh
# inside a torch.compile trace (the compiler folds the constant itself), and not kept when made
# during a CUDA-graph capture (its memory would belong to the graph's pool).
_PLACEMENTS: dict[tuple, torch.Tensor] = {}


def placement(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _placement(n, k, dtype, device)
    key = (n, k, dtype, device)
    if key in _PLACEMENTS:
        return _PLACEMENTS[key]
    # Never an inference tensor (made under torch.inference_mode): autograd could not save it later.
    with torch.inference_mode(False), torch.no_grad():
        made = _placement(n, k, dtype, device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _PLACEMENTS[key] = made
    return made


def constant_conv(v: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """conv2d(v tiled over an n x n grid, weight, padding=K // 2), exactly, without tiling it.

    v [B, C] (B may be 1 for an input shared by every scene), weight [O, C, K, K] with K odd
    and any strides (a piece of a split weight is read in place); returns [B, O, n, n], no bias.
    """
    if v.dim() != 2 or weight.dim() != 4 or v.shape[1] != weight.shape[1]:
        raise ValueError(f"v, weight: expected [B, C] and [O, C, K, K], got {list(v.shape)} and {list(weight.shape)}")
    out_channels, _, k, _ = weight.shape
    if k % 2 == 0 or weight.shape[3] != k:
        raise ValueError(f"weight: expected an odd square kernel, got {list(weight.shape)}")
    # T per output channel: [B, C] @ [C, K*K]; bmm reads each channel's [C, K*K] block in place
    # (a single matmul would need a transposed copy of the weight).
    taps = torch.bmm(v.expand(out_channels, -1, -1), weight.flatten(2))  # [O, B, K*K]
    out = taps.transpose(0, 1).reshape(-1, k * k) @ placement(n, k, taps.dtype, taps.device)  # [B*O, n*n]
    return out.view(v.shape[0], out_channels, n, n)
