"""Exact algebra that lets the fast model skip the 128x64x64 canvas (docs/spec.md, "Where the
speed comes from").

A transposed conv k4 s4 (weight T [H, C, 4, 4], bias t) writes each 16x16 position into its own
4x4 block of the 64x64 canvas, and a conv k4 s4 (weight A [C', C, 4, 4], bias a) reads each
block back. Their composition is therefore a 1x1 conv on the 16x16 grid:
    A(T(h)) = M h + (A . t) + a,   M[c', h] = sum_{c, i, j} A[c', c, i, j] T[h, c, i, j].
Likewise the 1x1 output conv O [3, C] after T is one transposed conv straight to 3 channels,
with weight P[h, o, i, j] = sum_c O[o, c] T[h, c, i, j].

Both are matrix products over flattened views of the weights (no copies). Not einsum: it spends
about ten permute, view and unsqueeze ops on each call, each one an autograd node too, and with
one core per step the model makes 78 of these maps per forward (measured with bench/op_count.py).
"""

import torch


def downsample_after_upsample(down_w, up_w, up_b=None):
    """The 1x1 map of conv(k4 s4, down_w) . convT(k4 s4, up_w, up_b), without the down bias.

    down_w [C', C, 4, 4], up_w [H, C, 4, 4], up_b [C] -> (weight [C', H], bias [C'], or None
    without up_b).
    """
    weight = down_w.flatten(1) @ up_w.flatten(1).t()
    bias = None if up_b is None else down_w.sum(dim=(2, 3)) @ up_b
    return weight, bias


def observation_after_upsample(obs_w, up_w, up_b):
    """The 1x1 output conv O [3, C, 1, 1] after convT(k4 s4) [H, C, 4, 4] as one convT [H, 3, 4, 4].

    Returns (weight [H, 3, 4, 4], bias [3]): the bias is O's share of the canvas bias up_b, without
    O's own bias.
    """
    obs = obs_w.flatten(1)  # [3, C]
    # [3, C] @ [C, 16] for each h; bmm reads the expanded obs in place (matmul would copy it).
    weight = torch.bmm(obs.expand(up_w.shape[0], -1, -1), up_w.flatten(2))  # [H, 3, 16]
    return weight.view(up_w.shape[0], obs.shape[0], *up_w.shape[2:]), obs @ up_b
