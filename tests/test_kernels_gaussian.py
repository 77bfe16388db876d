"""gqn_fast.kernels.gaussian_sample_kl / gaussian_kl against a float64 oracle built on
torch.distributions, on every path (test_kernels_dispatch)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from gqn_fast.kernels import gaussian_kl, gaussian_sample_kl
from test_kernels_dispatch import (
    LAYOUTS,
    assert_matches_oracle,
    path_cases,
    random_values,
    select_path,
    with_fixtures,
    with_layout,
)

# fp16 gradients through a tiny sigma overflow to inf (as the reference rounded to fp16
# does: assert_matches_oracle); the interpreter's numpy says so on every such cast.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

NAMES = ("mu_q", "s_q", "mu_p", "s_p", "eps")


def sample_kl_oracle(mu_q, s_q, mu_p, s_p, eps):
    """(z, kl) in float64: torch's softplus and its Normal-Normal KL, summed per sample."""
    sigma_q, sigma_p = F.softplus(s_q), F.softplus(s_p)
    kl = kl_divergence(Normal(mu_q, sigma_q), Normal(mu_p, sigma_p))
    z = None if eps is None else mu_q + sigma_q * eps
    return z, kl.reshape(kl.shape[0], -1).sum(dim=1)


def draw_parameters(shape, dtype, device, gen, mu_scale, s_low, s_high, layout):
    """mu ~ N(0, mu_scale^2), s ~ U(s_low, s_high), eps ~ N(0, 1); s_q and s_p at least 1/2 apart.

    Why apart: as sigma_q -> sigma_p the KL goes to 0 like (sigma_q - sigma_p)^2, and
    sigma = softplus(s) rounded to fp32 (relative error 6e-8) then gives the KL a relative
    error of about 1e-7 sigma / |sigma_q - sigma_p|: beyond 1e-5 within 1% of a tie, for any
    evaluation from fp32 sigmas. test_gaussian_kl_near_ties covers that regime with its own
    tolerance.
    """

    def uniform():
        return s_low + (s_high - s_low) * torch.rand(shape, generator=gen, dtype=torch.float64)

    def normal(scale):
        return random_values(shape, scale, 0.0, 0.0, gen, dtype, device, requires_grad=False)

    s_q, s_p = uniform(), uniform()
    gap = s_p - s_q
    s_p = torch.where(gap.abs() < 0.5, s_q + torch.where(gap < 0, -0.5, 0.5), s_p)
    s_q, s_p = (s.to(dtype=dtype, device=device) for s in (s_q, s_p))
    tensors = [normal(mu_scale), s_q, normal(mu_scale), s_p, normal(1.0)]
    return [with_layout(t, layout).requires_grad_() for t in tensors]


def check_against_oracle(inputs, grad_z, grad_kl, with_sample):
    """Outputs of the op and every input gradient against the float64 oracle."""
    inputs = inputs if with_sample else inputs[:4]
    if with_sample:
        z, kl = gaussian_sample_kl(*inputs)
        assert z.dtype == inputs[0].dtype and z.shape == inputs[0].shape
        outputs, grad_outputs = (z, kl), (grad_z, grad_kl)
    else:
        kl = gaussian_kl(*inputs)
        outputs, grad_outputs = (kl,), (grad_kl,)
    expected_kl_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    assert kl.dtype == expected_kl_dtype and kl.shape == (inputs[0].shape[0],)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs)

    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    z_ref, kl_ref = sample_kl_oracle(*inputs64[:4], inputs64[4] if with_sample else None)
    outputs_ref = (z_ref, kl_ref) if with_sample else (kl_ref,)
    grads_ref = torch.autograd.grad(outputs_ref, inputs64, tuple(g.double() for g in grad_outputs))

    assert_matches_oracle(kl, kl_ref, "kl")
    if with_sample:
        assert_matches_oracle(z, z_ref, "z")
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref):
        assert grad.dtype == inputs[0].dtype
        assert_matches_oracle(grad, grad_ref, f"grad {name}")
    return outputs


# ---------------------------------------------------------------------------------------
# Outputs and gradients, drawn shapes, values (s from -20 to 20) and layouts
# ---------------------------------------------------------------------------------------


@path_cases()
@with_fixtures
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 9),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    mu_scale=st.sampled_from([1e-2, 1.0, 10.0]),
    s_range=st.sampled_from([(-3.0, 3.0), (-20.0, 20.0), (-20.0, -10.0), (10.0, 20.0)]),
    layout=st.sampled_from(LAYOUTS),
    with_sample=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gaussian_kl_matches_float64_oracle(
    device, interpret, dtype, nan_poison, monkeypatch, batch, channels, height, width, mu_scale, s_range, layout,
    with_sample, seed,
):  # fmt: skip
    select_path(monkeypatch, interpret)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width)
    inputs = draw_parameters(shape, dtype, device, gen, mu_scale, *s_range, layout)
    grad_z = random_values(shape, 1.0, 0.0, 0.0, gen, dtype, device, requires_grad=False)
    grad_kl = torch.randn(batch, generator=gen).to(device)
    (first, *_) = check_against_oracle(inputs, grad_z, grad_kl, with_sample)
    if with_sample and layout == "channels_last" and inputs[0].is_contiguous(memory_format=torch.channels_last):
        assert first.is_contiguous(memory_format=torch.channels_last)


@path_cases(dtypes=[torch.float32])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 2, 2, 3)], ids=["1d", "2d", "5d"])
def test_gaussian_kl_any_rank(device, interpret, dtype, nan_poison, monkeypatch, shape):
    select_path(monkeypatch, interpret)
    gen = torch.Generator().manual_seed(0)
    inputs = [t.detach().requires_grad_() for t in draw_parameters(shape, dtype, device, gen, 1.0, -5, 5, "contiguous")]
    grad_z, grad_kl = torch.randn(shape, device=device), torch.randn(shape[0], device=device)
    check_against_oracle(inputs, grad_z, grad_kl, with_sample=True)


@path_cases(dtypes=[torch.float32])
def test_gaussian_kl_chunked_and_expanded_inputs(device, interpret, dtype, nan_poison, monkeypatch):
    """The model's layout: (mu, s) as the two halves of one conv output, eps and the upstream
    gradients expanded or sliced."""
    select_path(monkeypatch, interpret)
    posterior = torch.randn(3, 2 * 4, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    prior = torch.randn(3, 2 * 4, 5, 5, device=device)
    mu_q, s_q = (t.detach().requires_grad_() for t in posterior.chunk(2, dim=1))
    mu_p, s_p = (t.detach().requires_grad_() for t in prior.chunk(2, dim=1))
    eps = torch.randn(1, 4, 5, 1, device=device).expand(3, 4, 5, 5).detach().requires_grad_()
    grad_z = torch.randn(3, 4, 5, 10, device=device)[..., ::2]
    grad_kl = torch.randn((), device=device).expand(3)  # as from kl.sum()
    check_against_oracle([mu_q, s_q, mu_p, s_p, eps], grad_z, grad_kl, with_sample=True)


def test_gaussian_kl_cpu_and_interpreter_agree(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    inputs = draw_parameters((3, 5, 4, 6), torch.float32, "cpu", gen, 1.0, -20, 20, "contiguous")
    grad_z, grad_kl = torch.randn(3, 5, 4, 6), torch.randn(3)
    results = []
    for interpret in (False, True):
        select_path(monkeypatch, interpret)
        z, kl = gaussian_sample_kl(*inputs)
        results.append((z, kl, gaussian_kl(*inputs[:4])) + torch.autograd.grad((z, kl), inputs, (grad_z, grad_kl)))
    for torch_path, interpreted in zip(*results):
        torch.testing.assert_close(interpreted, torch_path, rtol=1e-5, atol=1e-6)


def test_gaussian_kl_gradcheck_float64(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    for interpret in (False, True):
        select_path(monkeypatch, interpret)
        inputs = draw_parameters((2, 2, 1, 2), torch.float64, "cpu", gen, 1.0, -3, 3, "contiguous")
        assert torch.autograd.gradcheck(gaussian_sample_kl, inputs)
        assert torch.autograd.gradcheck(gaussian_kl, inputs[:4])


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu-torch", "cpu-interpreter"])
def test_gaussian_kl_of_equal_distributions_is_zero(interpret, monkeypatch):
    select_path(monkeypatch, interpret)
    mu, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 10
    assert torch.equal(gaussian_kl(mu, s, mu, s), torch.zeros(2))


@pytest.mark.parametrize("interpret", [False, True], ids=["cpu-torch", "cpu-interpreter"])
def test_gaussian_kl_near_ties(interpret, monkeypatch):
    """Posterior within 1e-3 .. 1e-1 of the prior in s, one element per sample: each KL holds
    to the error that fp32 rounding of sigma implies (see draw_parameters), which the
    textbook form log(sigma_p / sigma_q) + sigma_q^2 / (2 sigma_p^2) - 1/2 misses by far."""
    select_path(monkeypatch, interpret)
    gen = torch.Generator().manual_seed(4)
    n = 400
    s_q = ((torch.rand(n, 1, generator=gen, dtype=torch.float64) - 0.5) * 40).float()
    gap = 10 ** (-3 + 2 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    s_p = (s_q.double() + gap * sign).float()
    mu = torch.randn(n, 1, generator=gen)
    kl = gaussian_kl(mu, s_q, mu, s_p).double()  # mu_q = mu_p: only the sigmas differ
    _, kl_ref = sample_kl_oracle(mu.double(), s_q.double(), mu.double(), s_p.double(), None)
    sigma_q, sigma_p = F.softplus(s_q.double()).flatten(), F.softplus(s_p.double()).flatten()
    conditioning = sigma_q.maximum(sigma_p) / (sigma_q - sigma_p).abs()
    allowed = 2.0**-20 * (1 + conditioning) * kl_ref  # a few fp32 roundings of sigma, amplified
    assert ((kl - kl_ref).abs() <= allowed).all()
    sigma_q32, sigma_p32 = F.softplus(s_q).flatten(), F.softplus(s_p).flatten()
    textbook = torch.log(sigma_p32 / sigma_q32) + sigma_q32**2 / (2 * sigma_p32**2) - 0.5
    assert not ((textbook.double() - kl_ref).abs() <= allowed).all()


def test_gaussian_kl_empty():
    inputs = [torch.randn(0, 3, 2, 2) for _ in range(5)]
    z, kl = gaussian_sample_kl(*inputs)
    assert z.shape == (0, 3, 2, 2) and kl.shape == (0,)
    assert torch.equal(gaussian_kl(*[torch.randn(2, 0, 3) for _ in range(4)]), torch.zeros(2))


# ---------------------------------------------------------------------------------------
# NaN in, NaN out
# ---------------------------------------------------------------------------------------


@path_cases(dtypes=[torch.float32, torch.float16])
@pytest.mark.parametrize("where", NAMES)
def test_gaussian_kl_nan_propagates(device, interpret, dtype, nan_poison, monkeypatch, where):
    select_path(monkeypatch, interpret)
    inputs = [torch.randn(3, 2, 3, 3, dtype=dtype, device=device) for _ in NAMES]
    inputs[NAMES.index(where)][1, 1, 2, 0] = float("nan")
    inputs = [t.requires_grad_() for t in inputs]
    z, kl = gaussian_sample_kl(*inputs)
    # z = mu_q + sigma_q eps sees mu_q, s_q and eps; kl sees the four parameters.
    assert torch.isnan(z[1, 1, 2, 0]) == (where in ("mu_q", "s_q", "eps"))
    assert torch.isnan(kl[1]) == (where != "eps")
    assert torch.isfinite(kl[[0, 2]]).all()
    assert torch.isnan(gaussian_kl(*inputs[:4])[1]) == (where != "eps")
    grads = torch.autograd.grad((z, kl), inputs, (torch.ones_like(z), torch.ones_like(kl)))
    assert torch.isnan(grads[NAMES.index(where)][1, 1, 2, 0]) or where == "eps"


# ---------------------------------------------------------------------------------------
# Bad input: the error names the argument, the expected and the received
# ---------------------------------------------------------------------------------------


def _bad_gaussian_inputs():
    good = [torch.randn(2, 3, 4, 4) for _ in NAMES]

    def replace(index, tensor):
        return good[:index] + [tensor] + good[index + 1 :]

    cases = [
        (replace(1, torch.randn(2, 3, 4, 5)), ValueError, r"s_q: expected shape \[2, 3, 4, 4\].*got \[2, 3, 4, 5\]"),
        (replace(3, torch.randn(3, 3, 4, 4)), ValueError, r"s_p: expected shape"),
        (replace(4, torch.randn(2, 3, 4)), ValueError, r"eps: expected shape"),
        (replace(2, good[2].double()), TypeError, r"mu_p: expected dtype torch.float32.*got torch.float64"),
        (replace(0, good[0].long()), TypeError, r"mu_q: expected a floating-point tensor.*torch.int64"),
        (replace(4, good[4].int()), TypeError, r"eps: expected a floating-point tensor"),
        (replace(0, torch.tensor(1.0)), ValueError, r"mu_q: expected at least 1 dims"),
    ]
    other = torch.device("cuda" if torch.cuda.is_available() else "meta")
    cases.append((replace(3, good[3].to(other)), ValueError, rf"s_p: expected device cpu.*got {other.type}"))
    return cases


@pytest.mark.parametrize("args,error,match", _bad_gaussian_inputs())
def test_gaussian_kl_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        gaussian_sample_kl(*args)
    if "eps" not in match:
        with pytest.raises(error, match=match):
            gaussian_kl(*args[:4])


# ---------------------------------------------------------------------------------------
# torch.compile: one graph, no break, same values as eager
# ---------------------------------------------------------------------------------------


def test_gaussian_kl_compiles_without_graph_break(monkeypatch):
    select_path(monkeypatch, interpret=False)  # eager and compiled: the CPU's PyTorch path
    def loss(mu_q, s_q, mu_p, s_p, eps):
        z, kl = gaussian_sample_kl(mu_q, s_q, mu_p, s_p, eps)
        return z.square().sum() + kl.sum() + 0.5 * gaussian_kl(mu_q, s_q, mu_p, s_p).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    inputs = draw_parameters((2, 3, 4, 4), torch.float32, "cpu", gen, 1.0, -5, 5, "contiguous")
    out, out_ref = compiled(*inputs), loss(*inputs)
    grads, grads_ref = torch.autograd.grad(out, inputs), torch.autograd.grad(out_ref, inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)
