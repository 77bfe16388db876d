"""gqn_fast.kernels.posterior_sample_kl / posterior_kl / elementwise_gaussian_kl_from_sigma against
a float64 oracle built on torch.distributions, on every path (test_kernels_dispatch)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from gqn_fast.kernels import elementwise_gaussian_kl_from_sigma, posterior_kl, posterior_sample_kl
from gqn_fast.kernels.utils import pytorch_path
from hypothesis import given
from hypothesis import strategies as st
from test_kernels_dispatch import (
    CPU_PATHS,
    LAYOUTS,
    OP_PATHS,
    assert_matches_oracle,
    on_interpreter,
    path_cases,
    random_values,
    select_path,
    with_fixtures,
    with_layout,
)
from torch.distributions import Normal, kl_divergence

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
    evaluation from fp32 sigmas. test_posterior_kl_near_ties covers that regime with its own
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
        z, kl = posterior_sample_kl(*inputs)
        assert z.dtype == inputs[0].dtype and z.shape == inputs[0].shape
        outputs, grad_outputs = (z, kl), (grad_z, grad_kl)
    else:
        kl = posterior_kl(*inputs)
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
def test_posterior_kl_matches_float64_oracle(
    device, interpret, dtype, nan_poison, batch, channels, height, width, mu_scale, s_range, layout,
    with_sample, seed,
):  # fmt: skip
    select_path(interpret)
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
def test_posterior_kl_any_rank(device, interpret, dtype, nan_poison, shape):
    select_path(interpret)
    gen = torch.Generator().manual_seed(0)
    inputs = [t.detach().requires_grad_() for t in draw_parameters(shape, dtype, device, gen, 1.0, -5, 5, "contiguous")]
    grad_z, grad_kl = torch.randn(shape, device=device), torch.randn(shape[0], device=device)
    check_against_oracle(inputs, grad_z, grad_kl, with_sample=True)


@path_cases(dtypes=[torch.float32])
def test_posterior_kl_chunked_and_expanded_inputs(device, interpret, dtype, nan_poison):
    """The model's layout: (mu, s) as the two halves of one conv output, eps and the upstream
    gradients expanded or sliced."""
    select_path(interpret)
    posterior = torch.randn(3, 2 * 4, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    prior = torch.randn(3, 2 * 4, 5, 5, device=device)
    mu_q, s_q = (t.detach().requires_grad_() for t in posterior.chunk(2, dim=1))
    mu_p, s_p = (t.detach().requires_grad_() for t in prior.chunk(2, dim=1))
    eps = torch.randn(1, 4, 5, 1, device=device).expand(3, 4, 5, 5).detach().requires_grad_()
    grad_z = torch.randn(3, 4, 5, 10, device=device)[..., ::2]
    grad_kl = torch.randn((), device=device).expand(3)  # as from kl.sum()
    check_against_oracle([mu_q, s_q, mu_p, s_p, eps], grad_z, grad_kl, with_sample=True)


@on_interpreter
def test_posterior_kl_cpu_and_interpreter_agree():
    select_path(True)
    gen = torch.Generator().manual_seed(1)
    inputs = draw_parameters((3, 5, 4, 6), torch.float32, "cpu", gen, 1.0, -20, 20, "contiguous")
    grad_z, grad_kl = torch.randn(3, 5, 4, 6), torch.randn(3)
    results = []
    for path in (pytorch_path, contextlib.nullcontext):
        with path():
            z, kl = posterior_sample_kl(*inputs)
            results.append((z, kl, posterior_kl(*inputs[:4])) + torch.autograd.grad((z, kl), inputs, (grad_z, grad_kl)))
    for torch_path, interpreted in zip(*results):
        torch.testing.assert_close(interpreted, torch_path, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_posterior_kl_gradcheck_float64(interpret):
    select_path(interpret)
    gen = torch.Generator().manual_seed(2)
    inputs = draw_parameters((2, 2, 1, 2), torch.float64, "cpu", gen, 1.0, -3, 3, "contiguous")
    assert torch.autograd.gradcheck(posterior_sample_kl, inputs)
    assert torch.autograd.gradcheck(posterior_kl, inputs[:4])


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_posterior_kl_of_equal_distributions_is_zero(interpret):
    select_path(interpret)
    mu, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 10
    assert torch.equal(posterior_kl(mu, s, mu, s), torch.zeros(2))


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_posterior_kl_near_ties(interpret):
    """Posterior within 1e-3 .. 1e-1 of the prior in s, one element per sample: each KL holds
    to the error that fp32 rounding of sigma implies (see draw_parameters), which the
    textbook form log(sigma_p / sigma_q) + sigma_q^2 / (2 sigma_p^2) - 1/2 misses by far."""
    select_path(interpret)
    gen = torch.Generator().manual_seed(4)
    n = 400
    s_q = ((torch.rand(n, 1, generator=gen, dtype=torch.float64) - 0.5) * 40).float()
    gap = 10 ** (-3 + 2 * torch.rand(n, 1, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(n, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    s_p = (s_q.double() + gap * sign).float()
    mu = torch.randn(n, 1, generator=gen)
    kl = posterior_kl(mu, s_q, mu, s_p).double()  # mu_q = mu_p: only the sigmas differ
    _, kl_ref = sample_kl_oracle(mu.double(), s_q.double(), mu.double(), s_p.double(), None)
    sigma_q, sigma_p = F.softplus(s_q.double()).flatten(), F.softplus(s_p.double()).flatten()
    conditioning = sigma_q.maximum(sigma_p) / (sigma_q - sigma_p).abs()
    allowed = 2.0**-20 * (1 + conditioning) * kl_ref  # a few fp32 roundings of sigma, amplified
    assert ((kl - kl_ref).abs() <= allowed).all()
    sigma_q32, sigma_p32 = F.softplus(s_q).flatten(), F.softplus(s_p).flatten()
    textbook = torch.log(sigma_p32 / sigma_q32) + sigma_q32**2 / (2 * sigma_p32**2) - 0.5
    assert not ((textbook.double() - kl_ref).abs() <= allowed).all()


def test_posterior_kl_empty():
    inputs = [torch.randn(0, 3, 2, 2) for _ in range(5)]
    z, kl = posterior_sample_kl(*inputs)
    assert z.shape == (0, 3, 2, 2) and kl.shape == (0,)
    assert torch.equal(posterior_kl(*[torch.randn(2, 0, 3) for _ in range(4)]), torch.zeros(2))


# ---------------------------------------------------------------------------------------
# NaN in, NaN out
# ---------------------------------------------------------------------------------------


@path_cases(dtypes=[torch.float32, torch.float16])
@pytest.mark.parametrize("where", NAMES)
def test_posterior_kl_nan_propagates(device, interpret, dtype, nan_poison, where):
    select_path(interpret)
    inputs = [torch.randn(3, 2, 3, 3, dtype=dtype, device=device) for _ in NAMES]
    inputs[NAMES.index(where)][1, 1, 2, 0] = float("nan")
    inputs = [t.requires_grad_() for t in inputs]
    z, kl = posterior_sample_kl(*inputs)
    # z = mu_q + sigma_q eps sees mu_q, s_q and eps; kl sees the four parameters.
    assert torch.isnan(z[1, 1, 2, 0]) == (where in ("mu_q", "s_q", "eps"))
    assert torch.isnan(kl[1]) == (where != "eps")
    assert torch.isfinite(kl[[0, 2]]).all()
    assert torch.isnan(posterior_kl(*inputs[:4])[1]) == (where != "eps")
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
def test_posterior_kl_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        posterior_sample_kl(*args)
    if "eps" not in match:
        with pytest.raises(error, match=match):
            posterior_kl(*args[:4])


# ---------------------------------------------------------------------------------------
# torch.compile: one graph, no break, same values as eager
# ---------------------------------------------------------------------------------------


def test_posterior_kl_compiles_without_graph_break():
    select_path(False)  # eager and compiled: the CPU's PyTorch path

    def loss(mu_q, s_q, mu_p, s_p, eps):
        z, kl = posterior_sample_kl(mu_q, s_q, mu_p, s_p, eps)
        return z.square().sum() + kl.sum() + 0.5 * posterior_kl(mu_q, s_q, mu_p, s_p).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    inputs = draw_parameters((2, 3, 4, 4), torch.float32, "cpu", gen, 1.0, -5, 5, "contiguous")
    out, out_ref = compiled(*inputs), loss(*inputs)
    grads, grads_ref = torch.autograd.grad(out, inputs), torch.autograd.grad(out_ref, inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# elementwise_gaussian_kl_from_sigma: the KL of every element, from the sigmas themselves
# ---------------------------------------------------------------------------------------

SIGMA_NAMES = ("mu_q", "sigma_q", "mu_p", "sigma_p")


def draw_sigma_parameters(shape, dtype, device, gen, mu_scale, s_low, s_high, layout):
    """(mu_q, sigma_q, mu_p, sigma_p): draw_parameters' values, with sigma = softplus(s) in float64."""
    mu_q, s_q, mu_p, s_p, _ = draw_parameters(shape, torch.float64, "cpu", gen, mu_scale, s_low, s_high, "contiguous")
    values = [mu_q, F.softplus(s_q), mu_p, F.softplus(s_p)]
    return [with_layout(t.detach().to(dtype=dtype, device=device), layout).requires_grad_() for t in values]


def check_elementwise_against_oracle(inputs, grad_kl):
    kl = elementwise_gaussian_kl_from_sigma(*inputs)
    assert kl.dtype == inputs[0].dtype and kl.shape == inputs[0].shape
    grads = torch.autograd.grad(kl, inputs, grad_kl)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    kl_ref = kl_divergence(Normal(inputs64[0], inputs64[1]), Normal(inputs64[2], inputs64[3]))
    grads_ref = torch.autograd.grad(kl_ref, inputs64, grad_kl.double())
    assert_matches_oracle(kl, kl_ref, "kl")
    for name, grad, grad_ref in zip(SIGMA_NAMES, grads, grads_ref):
        assert grad.dtype == inputs[0].dtype and grad.shape == inputs[0].shape
        assert_matches_oracle(grad, grad_ref, f"grad {name}")
    return kl


@path_cases()
@with_fixtures
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    mu_scale=st.sampled_from([1e-2, 1.0, 10.0]),
    s_range=st.sampled_from([(-3.0, 3.0), (-8.0, 8.0), (-8.0, -4.0), (4.0, 8.0)]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_elementwise_kl_from_sigma_matches_float64_oracle(
    device, interpret, dtype, nan_poison, shape, mu_scale, s_range, layout, seed
):
    """Sigmas from softplus(-8) ~ 3e-4 to softplus(8) ~ 8, any rank and layout."""
    select_path(interpret)
    gen = torch.Generator().manual_seed(seed)
    inputs = draw_sigma_parameters(shape, dtype, device, gen, mu_scale, *s_range, layout)
    grad_kl = random_values(shape, 1.0, 0.0, 0.0, gen, dtype, device, requires_grad=False)
    kl = check_elementwise_against_oracle(inputs, grad_kl)
    if layout == "channels_last" and inputs[0].is_contiguous(memory_format=torch.channels_last):
        assert kl.is_contiguous(memory_format=torch.channels_last)


@path_cases(dtypes=[torch.float32])
def test_elementwise_kl_from_sigma_of_scalars_and_expanded_inputs(device, interpret, dtype, nan_poison):
    """0-d tensors, and a prior N(0, 1) expanded from one element (stride 0), as broadcasting gives."""
    select_path(interpret)
    scalars = [torch.tensor(v, device=device, requires_grad=True) for v in (0.3, 0.7, -0.2, 1.3)]
    check_elementwise_against_oracle(scalars, torch.tensor(1.0, device=device))
    gen = torch.Generator().manual_seed(6)
    mu_q, sigma_q, _, _ = draw_sigma_parameters((3, 4, 5), dtype, device, gen, 1.0, -3, 3, "sliced")
    mu_p, sigma_p = (torch.full((1,), v, device=device).expand(3, 4, 5).requires_grad_() for v in (0.0, 1.0))
    check_elementwise_against_oracle([mu_q, sigma_q, mu_p, sigma_p], torch.randn(3, 4, 5, device=device))


@on_interpreter
def test_elementwise_kl_from_sigma_cpu_and_interpreter_agree():
    select_path(True)
    gen = torch.Generator().manual_seed(7)
    inputs = draw_sigma_parameters((3, 5, 4, 6), torch.float32, "cpu", gen, 1.0, -8, 8, "contiguous")
    grad_kl = torch.randn(3, 5, 4, 6, generator=gen)
    results = []
    for path in (pytorch_path, contextlib.nullcontext):
        with path():
            kl = elementwise_gaussian_kl_from_sigma(*inputs)
            results.append((kl,) + torch.autograd.grad(kl, inputs, grad_kl))
    for torch_path, interpreted in zip(*results):
        torch.testing.assert_close(interpreted, torch_path, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_elementwise_kl_from_sigma_gradcheck_float64_and_ties(interpret):
    select_path(interpret)
    gen = torch.Generator().manual_seed(8)
    inputs = draw_sigma_parameters((2, 3, 2), torch.float64, "cpu", gen, 1.0, -3, 3, "contiguous")
    assert torch.autograd.gradcheck(elementwise_gaussian_kl_from_sigma, inputs)
    mu, sigma = torch.randn(2, 3, 4), torch.rand(2, 3, 4) + 0.1
    assert torch.equal(elementwise_gaussian_kl_from_sigma(mu, sigma, mu, sigma), torch.zeros(2, 3, 4))


@path_cases(dtypes=[torch.float32, torch.float16])
@pytest.mark.parametrize("where", SIGMA_NAMES)
def test_elementwise_kl_from_sigma_nan_propagates(device, interpret, dtype, nan_poison, where):
    """A NaN reaches its own element's KL and its own gradient, and no other element."""
    select_path(interpret)
    inputs = [torch.randn(3, 2, 3, dtype=dtype, device=device) for _ in SIGMA_NAMES]
    inputs[1], inputs[3] = inputs[1].abs() + 0.5, inputs[3].abs() + 0.5
    inputs[SIGMA_NAMES.index(where)][1, 1, 2] = float("nan")
    inputs = [t.requires_grad_() for t in inputs]
    kl = elementwise_gaussian_kl_from_sigma(*inputs)
    expect = torch.zeros(3, 2, 3, dtype=torch.bool, device=device)
    expect[1, 1, 2] = True
    assert torch.equal(torch.isnan(kl), expect)
    grads = torch.autograd.grad(kl, inputs, torch.ones_like(kl))
    assert torch.isnan(grads[SIGMA_NAMES.index(where)][1, 1, 2])
    for grad in grads:  # dKL/dsigma_q does not see the mus: NaN there only where it should be
        assert not (torch.isnan(grad) & ~expect).any()


@pytest.mark.parametrize(
    "index,bad,error,match",
    [
        (1, torch.rand(2, 3, 5), ValueError, r"sigma_q: expected shape \[2, 3, 4\].*got \[2, 3, 5\]"),
        (2, torch.randn(2, 3, 4).double(), TypeError, r"mu_p: expected dtype torch.float32.*got torch.float64"),
        (0, torch.ones(2, 3, 4, dtype=torch.long), TypeError, r"mu_q: expected a floating-point tensor"),
        (3, torch.rand(2, 3, 4, device="meta"), ValueError, r"sigma_p: expected device cpu.*got meta"),
    ],
)
def test_elementwise_kl_from_sigma_rejects_bad_input(index, bad, error, match):
    args = [torch.randn(2, 3, 4), torch.rand(2, 3, 4) + 0.1, torch.randn(2, 3, 4), torch.rand(2, 3, 4) + 0.1]
    args[index] = bad
    with pytest.raises(error, match=match):
        elementwise_gaussian_kl_from_sigma(*args)


@pytest.mark.parametrize("device,interpret", OP_PATHS)
def test_elementwise_kl_from_sigma_opcheck(device, interpret):
    select_path(interpret)
    make = lambda: torch.rand(2, 3, 4, device=device) + 0.1  # noqa: E731 (positive: they serve as sigmas too)
    inputs = [make().requires_grad_() for _ in SIGMA_NAMES]
    torch.library.opcheck(torch.ops.gqn_fast.elementwise_gaussian_kl_from_sigma.default, inputs)
    plain = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.gqn_fast.elementwise_gaussian_kl_from_sigma_backward.default, (*plain, make()))
