"""gqn_fast.nn.functional.normal_kl against torch.distributions.kl_divergence(Normal, Normal)
in float64: values, every gradient, broadcasting and plain numbers, on both CPU paths."""

import pytest
import torch
from helpers import RMS_LIMITS, assert_close_rms, rel_rms
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_dispatch import CPU_PATHS, select_path, with_fixtures
from torch.distributions import Normal, kl_divergence

from gqn_fast.nn.functional import normal_kl

NAMES = ("q_loc", "q_scale", "p_loc", "p_scale")


@st.composite
def broadcast_arguments(draw):
    """A result shape and, per argument, a shape that broadcasts to it (dims dropped from the
    front or set to 1) or None for a plain number."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
    shapes = []
    for _ in NAMES:
        if draw(st.integers(0, 5)) == 0:
            shapes.append(None)
            continue
        kept = shape[draw(st.integers(0, len(shape))) :]
        shapes.append(tuple(1 if draw(st.booleans()) else n for n in kept))
    if all(s is None for s in shapes):
        shapes[0] = shape
    # The result has the full shape only if some argument has each dim: make one have all.
    shapes[draw(st.sampled_from([i for i, s in enumerate(shapes) if s is not None]))] = shape
    return shapes


def values(shape, is_scale, gen):
    """A location ~ N(0, 1) or a scale in [0.05, 3], as a float64 tensor (or a number for shape None)."""
    sample = torch.rand(shape or (), generator=gen, dtype=torch.float64)
    value = 0.05 + 2.95 * sample if is_scale else torch.randn(shape or (), generator=gen, dtype=torch.float64)
    return float(value) if shape is None else value


@pytest.mark.parametrize("interpret", CPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@settings(with_fixtures)
@given(shapes=broadcast_arguments(), seed=st.integers(0, 2**16))
def test_normal_kl_matches_torch_distributions(interpret, dtype, shapes, seed, nan_poison):
    select_path(interpret)
    gen = torch.Generator().manual_seed(seed)
    args64 = [values(shape, name.endswith("scale"), gen) for shape, name in zip(shapes, NAMES)]
    args = [a if isinstance(a, float) else a.to(dtype).requires_grad_() for a in args64]
    kl = normal_kl(*args)
    args64 = [a if isinstance(a, float) else a.double().detach().requires_grad_() for a in args]
    kl_ref = kl_divergence(Normal(args64[0], args64[1]), Normal(args64[2], args64[3]))
    assert kl.shape == kl_ref.shape and kl.dtype == dtype

    limit = RMS_LIMITS[torch.float32]  # fp32 compute for fp32; fp64 meets it by far
    assert_close_rms(kl, kl_ref, limit, "kl")
    grad_kl = torch.randn(kl.shape, generator=gen, dtype=torch.float64)
    tensors = [(name, a, a64) for name, a, a64 in zip(NAMES, args, args64) if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(kl, [a for _, a, _ in tensors], grad_kl.to(dtype))
    grads_ref = torch.autograd.grad(kl_ref, [a for _, _, a in tensors], grad_kl)
    for (name, arg, _), grad, grad_ref in zip(tensors, grads, grads_ref):
        assert grad.shape == arg.shape, f"grad {name}: the shape of {name}, summed over what it broadcast to"
        assert_close_rms(grad, grad_ref, limit, f"grad {name}")


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_normal_kl_is_accurate_where_q_and_p_nearly_agree(interpret):
    """Scales 1e-5 apart (relative): the KL, ~1e-10, keeps fp32's precision (1e-7 measured),
    where torch.distributions' fp32 formula, a difference of O(1e-5) terms, keeps ~5e-3."""
    select_path(interpret)
    loc = torch.zeros(1000)
    q_scale = torch.linspace(0.5, 2.0, 1000)
    p_scale = q_scale * (1 + 1e-5)
    kl = normal_kl(loc, q_scale, loc, p_scale)
    kl_ref = kl_divergence(Normal(loc.double(), q_scale.double()), Normal(loc.double(), p_scale.double()))
    kl_torch = kl_divergence(Normal(loc, q_scale), Normal(loc, p_scale))
    assert_close_rms(kl, kl_ref, 1e-5, "normal_kl near ties")
    assert not rel_rms(kl_torch, kl_ref) <= 1e-3


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_normal_kl_nan_stays_in_its_element(interpret, nan_poison):
    select_path(interpret)
    q_loc = torch.randn(3, 4)
    q_loc[1, 2] = float("nan")
    kl = normal_kl(q_loc, torch.ones(3, 4), 0.0, 1.0)
    assert torch.isnan(kl[1, 2]) and torch.isnan(kl).sum() == 1


def test_normal_kl_compiles_without_graph_break():
    select_path(False)

    def elbo_kl(q_loc, q_log_scale):
        return normal_kl(q_loc, q_log_scale.exp(), torch.zeros_like(q_loc), 1.0).sum()

    torch._dynamo.reset()
    compiled = torch.compile(elbo_kl, fullgraph=True, backend="aot_eager")
    q_loc, q_log_scale = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    out, out_ref = compiled(q_loc, q_log_scale), elbo_kl(q_loc, q_log_scale)
    torch.testing.assert_close(out, out_ref)
    for grad, grad_ref in zip(
        torch.autograd.grad(out, (q_loc, q_log_scale)), torch.autograd.grad(out_ref, (q_loc, q_log_scale))
    ):
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0.0, 1.0, 0.0, 1.0), TypeError, r"normal_kl: expected at least one torch.Tensor"),
        ((torch.zeros(3), torch.ones(3).double(), 0.0, 1.0), TypeError, r"q_scale: expected dtype torch.float32 \(as q_loc\), got torch.float64"),
        ((torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.long), 1.0), TypeError, r"p_loc: expected a floating-point tensor"),
        ((torch.zeros(3), torch.ones(3), 0.0, torch.ones(3, device="meta")), ValueError, r"p_scale: expected device cpu \(as q_loc\), got meta"),
        ((torch.zeros(3), torch.ones(4), 0.0, 1.0), ValueError, r"do not broadcast together: q_loc \[3\], q_scale \[4\]"),
        ((torch.zeros(3), "1", 0.0, 1.0), TypeError, r"q_scale: expected a torch.Tensor or a real number, got str"),
    ],
)  # fmt: skip
def test_normal_kl_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        normal_kl(*args)
