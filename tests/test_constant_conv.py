"""gqn_fast.constant_conv against F.conv2d of the tiled input: every position (so every border
pattern), the input's and the weight's gradients, and weights read in place from a split."""

import pytest
import torch
import torch.nn.functional as F
from helpers import RMS_LIMITS, assert_close_rms
from hypothesis import given
from hypothesis import strategies as st

from gqn_fast import constant_conv as constant_conv_module
from gqn_fast.constant_conv import constant_conv, inside_taps, placement


def tiled_conv(v, weight, n):
    return F.conv2d(v[:, :, None, None].expand(-1, -1, n, n), weight, padding=weight.shape[-1] // 2)


def conv_and_gradients(conv, v, weight, n, upstream):
    v, weight = v.detach().requires_grad_(), weight.detach().requires_grad_()
    # The weight is read as the middle piece of a split, as the model reads its cells' weights.
    extra = weight.new_zeros(weight.shape[0], 2, *weight.shape[2:])
    whole = torch.cat([extra, weight, extra], dim=1).requires_grad_()
    piece = whole.split([2, weight.shape[1], 2], dim=1)[1]
    out = conv(v, piece, n)
    grad_v, grad_whole = torch.autograd.grad(out, [v, whole], upstream)
    assert torch.all(grad_whole[:, :2] == 0) and torch.all(grad_whole[:, -2:] == 0)
    return out, grad_v, grad_whole[:, 2:-2]


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 6),
    out_channels=st.integers(1, 6),
    k=st.sampled_from([1, 3, 5, 7]),
    n=st.sampled_from([1, 2, 3, 4, 6, 16]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_matches_conv_of_tiled_input(batch, channels, out_channels, k, n, dtype, seed):
    """Grids smaller than the kernel included (taps cut on both sides of a row at once)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, channels, generator=g, dtype=torch.float64)
    weight = torch.randn(out_channels, channels, k, k, generator=g, dtype=torch.float64)
    upstream = torch.randn(batch, out_channels, n, n, generator=g, dtype=torch.float64)
    expected = conv_and_gradients(tiled_conv, v, weight, n, upstream)
    got = conv_and_gradients(constant_conv, v.to(dtype), weight.to(dtype), n, upstream.to(dtype))
    for name, g_, e in zip(["output", "grad v", "grad weight"], got, expected):
        assert g_.dtype == dtype
        assert_close_rms(g_, e, RMS_LIMITS[dtype], name)


def test_paper_grid_has_25_border_patterns():
    """On the 16x16 grid a 5x5 kernel gives 5 row cases x 5 column cases, each its own value."""
    torch.manual_seed(0)
    out = constant_conv(torch.randn(1, 4, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64), 16)
    for plane in out[0]:
        assert len(torch.unique(plane)) == 25
        assert torch.all(plane[2:14, 2:14] == plane[2, 2])  # interior: every tap inside


def test_inside_taps_counts():
    inside = inside_taps(16, 5, torch.float64, torch.device("cpu"))
    assert inside.sum(1).tolist() == [3, 4] + [5] * 12 + [4, 3]


def test_gradcheck():
    torch.manual_seed(0)
    v = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: constant_conv(a, b, 4), (v, weight))


@pytest.mark.parametrize("v_shape,w_shape", [((2, 3), (4, 2, 5, 5)), ((2, 3, 1), (4, 3, 5, 5)), ((2, 3), (4, 3, 4, 4))])
def test_bad_shapes_are_named(v_shape, w_shape):
    with pytest.raises(ValueError, match="v, weight|weight"):
        constant_conv(torch.zeros(v_shape), torch.zeros(w_shape), 16)


def test_placement_is_made_once_and_serves_autograd_after_inference_mode():
    """The 0/1 placement matrix is a constant kept per (n, k, dtype, device): made once, the
    same tensor after, equal to kron(R, R) transposed. Made first under torch.inference_mode it
    is still a normal tensor, so a later training step can save it for its backward."""
    n, k = 7, 3  # sizes no other test uses: the first call below makes the placement
    key = (n, k, torch.float64, torch.device("cpu"))
    constant_conv_module._PLACEMENTS.pop(key, None)
    v = torch.randn(2, 3, dtype=torch.float64)
    weight = torch.randn(4, 3, k, k, dtype=torch.float64)
    with torch.inference_mode():
        constant_conv(v, weight, n)
    made = constant_conv_module._PLACEMENTS[key]
    assert not made.is_inference()
    inside = inside_taps(n, k, torch.float64, torch.device("cpu"))
    assert torch.equal(made, torch.kron(inside, inside).T)
    assert placement(n, k, torch.float64, torch.device("cpu")) is made
    v.requires_grad_()
    (grad,) = torch.autograd.grad(constant_conv(v, weight, n).sum(), v)
    (expected,) = torch.autograd.grad(tiled_conv(v, weight, n).sum(), v)
    assert_close_rms(grad, expected, RMS_LIMITS[torch.float64], "grad v")
