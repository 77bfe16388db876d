"""The representation nets of reference/representation.py, computed the fast way: same parameters,
same function, exact in real arithmetic (docs/spec.md, "Where the speed comes from").

- The viewpoint v is tiled over the grid before a conv reads it, so its share of that conv is
  exact in closed form (gqn_fast.constant_conv): the tower's conv5 and conv6 convolve only the
  image features, and the pyramid's first conv (k2 s2, no padding: every tap lands inside) reads
  v as a per-image bias.
- The tower's conv5 and conv6 read the same input: one conv with both weights reads it once
  (and its backward writes one input gradient).
- ReLUs run in place on conv outputs, which the convs' backward does not read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqn_fast.constant_conv import constant_conv
from gqn_fast.reference.representation import Pool, Pyramid, Tower


def _relu(t: torch.Tensor) -> torch.Tensor:
    return F.relu(t, inplace=True)


def tower(net: Tower, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """net(x, v) for the reference's Tower."""
    h1 = _relu(net.conv1(x))  # 32x32
    skip = _relu(net.conv2(h1))  # 16x16
    h = _relu(net.conv3(h1))
    h = _relu(net.conv4(h)) + skip  # 16x16
    wide, narrow = net.conv5.out_channels, net.conv6.out_channels
    # conv5 and conv6 over cat[h, v tiled], as one conv over h plus v's closed-form share.
    h_weight, v_weight = torch.cat([net.conv5.weight, net.conv6.weight]).split([h.shape[1], v.shape[1]], dim=1)
    bias = torch.cat([net.conv5.bias, net.conv6.bias])
    both = F.conv2d(h, h_weight, bias, padding=1).add_(constant_conv(v, v_weight, h.shape[-1]))
    skip, h = _relu(both).split([wide, narrow], dim=1)
    h = _relu(net.conv7(h)) + skip
    return _relu(net.conv8(h))


def pyramid(net: Pyramid, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """net(x, v) for the reference's Pyramid."""
    x_weight, v_weight = net.conv1.weight.split([x.shape[1], v.shape[1]], dim=1)
    # A k2 s2 conv without padding of a constant input: every tap reads v, at every position.
    v_bias = v @ v_weight.sum(dim=(2, 3)).T + net.conv1.bias  # [N, r_dim / 8]
    h = _relu(F.conv2d(x, x_weight, stride=2).add_(v_bias[:, :, None, None]))
    h = _relu(net.conv2(h))
    h = _relu(net.conv3(h))
    return _relu(net.conv4(h))


def pool(net: Pool, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """net(x, v) for the reference's Pool: the tower, averaged over its grid."""
    return tower(net, x, v).mean(dim=(2, 3), keepdim=True)


# By exact class: Pool subclasses Tower, and a subclass of any net may compute something else.
_FAST_FORMS = {Tower: tower, Pool: pool, Pyramid: pyramid}


def represent(net: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """r^k = net(x, v) for any of the reference's representation nets, computed the fast way."""
    fast_form = _FAST_FORMS.get(type(net))
    if fast_form is None:
        raise TypeError(f"net: expected a reference Tower, Pool or Pyramid, got {type(net).__name__}")
    return fast_form(net, x, v)
