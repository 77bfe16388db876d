"""gqn_fast.representation against the reference's nets: the same parameters give the same r and
the same gradients, for every net, layout and dtype; ReLUs in every regime (the weights are drawn
at several scales and shifted, so that whole channels are dead or alive)."""

import pytest
import torch
from gqn_fast.reference.representation import NETS
from helpers import RMS_LIMITS, assert_close_rms
from hypothesis import given
from hypothesis import strategies as st

from gqn_fast.representation import represent


def r_and_gradients(run, net, x, v, upstream):
    x, v = x.detach().requires_grad_(), v.detach().requires_grad_()
    r = run(net, x, v)
    params = list(net.parameters())
    grads = torch.autograd.grad(r, params + [x, v], upstream)
    return (
        [("r", r)]
        + [(f"grad {n}", g) for (n, _), g in zip(net.named_parameters(), grads)]
        + [
            ("grad x", grads[-2]),
            ("grad v", grads[-1]),
        ]
    )


@given(
    name=st.sampled_from(sorted(NETS)),
    r_dim=st.sampled_from([8, 16, 24]),
    images=st.integers(1, 3),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    shift=st.floats(-0.5, 0.5),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_net(name, r_dim, images, scale, shift, channels_last, dtype, seed):
    torch.manual_seed(seed)
    oracle = NETS[name](r_dim, 7).double()
    with torch.no_grad():
        for p in oracle.parameters():
            p.mul_(scale).add_(shift * p.abs().mean())
    net = NETS[name](r_dim, 7).to(dtype)
    net.load_state_dict(oracle.state_dict())
    x, v = torch.rand(images, 3, 64, 64, dtype=torch.float64), torch.randn(images, 7, dtype=torch.float64)
    with torch.no_grad():
        upstream = torch.randn_like(oracle(x, v))
    expected = r_and_gradients(lambda n, x, v: n(x, v), oracle, x, v, upstream)
    x_in = x.to(dtype).contiguous(memory_format=torch.channels_last) if channels_last else x.to(dtype)
    got = r_and_gradients(represent, net, x_in, v.to(dtype), upstream.to(dtype))
    for (label, want), (_, have) in zip(expected, got):
        assert have.dtype == dtype, label
        assert_close_rms(have, want, RMS_LIMITS[dtype], label)


def test_unknown_net_is_named():
    with pytest.raises(TypeError, match="Linear"):
        represent(torch.nn.Linear(2, 2), torch.zeros(1, 3, 64, 64), torch.zeros(1, 7))
