"""gqn_fast.kernels.pixel_nll against a float64 oracle built on torch.distributions.Normal,
on every path (test_kernels_dispatch)."""

import contextlib
import math

import pytest
import torch
from gqn_fast.kernels import pixel_nll
from gqn_fast.kernels.utils import pytorch_path
from hypothesis import given
from hypothesis import strategies as st
from test_kernels_dispatch import (
    CPU_PATHS,
    LAYOUTS,
    assert_matches_oracle,
    on_interpreter,
    path_cases,
    random_values,
    select_path,
    sigmoid64,
    with_fixtures,
    with_layout,
)
from torch.distributions import Normal


def nll_oracle(x, logits, sigma):
    """-log N(x | sigmoid(logits), sigma^2) summed per sample, in float64."""
    nll = -Normal(sigmoid64(logits), sigma).log_prob(x)
    return nll.reshape(nll.shape[0], -1).sum(dim=1)


def check_against_oracle(x, logits, sigma, grad_nll):
    nll = pixel_nll(x, logits, sigma)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert nll.dtype == expected_dtype and nll.shape == (logits.shape[0],)
    grads = torch.autograd.grad(nll, (x, logits), grad_nll)
    x64, logits64 = (t.detach().double().requires_grad_() for t in (x, logits))
    nll_ref = nll_oracle(x64, logits64, sigma)
    grads_ref = torch.autograd.grad(nll_ref, (x64, logits64), grad_nll.double())
    assert_matches_oracle(nll, nll_ref, "nll")
    assert_matches_oracle(grads[0], grads_ref[0], "grad x")
    assert_matches_oracle(grads[1], grads_ref[1], "grad logits")
    return nll


# ---------------------------------------------------------------------------------------
# Outputs and gradients, drawn shapes, values (logits up to +-30), sigma and layouts
# ---------------------------------------------------------------------------------------


@path_cases()
@with_fixtures
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 9),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    logit_scale=st.sampled_from([1e-2, 1.0, 5.0]),
    extreme_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    sigma=st.floats(0.05, 5.0),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_pixel_nll_matches_float64_oracle(
    device, interpret, dtype, nan_poison, batch, channels, height, width, logit_scale,
    extreme_fraction, sigma, layout, seed,
):  # fmt: skip
    select_path(interpret)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width)
    x = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    x = with_layout(x, layout).requires_grad_()
    logits = random_values(shape, logit_scale, 30.0, extreme_fraction, gen, dtype, device, requires_grad=False)
    logits = with_layout(logits, layout).requires_grad_()
    grad_nll = torch.randn(batch, generator=gen).to(device)
    check_against_oracle(x, logits, sigma, grad_nll)


@path_cases(dtypes=[torch.float32])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 2, 2, 3)], ids=["1d", "2d", "5d"])
def test_pixel_nll_any_rank(device, interpret, dtype, nan_poison, shape):
    select_path(interpret)
    x = torch.rand(shape, device=device, requires_grad=True)
    logits = torch.randn(shape, device=device, requires_grad=True)
    check_against_oracle(x, logits, 0.7, torch.randn(shape[0], device=device))


@path_cases(dtypes=[torch.float32])
def test_pixel_nll_odd_strides(device, interpret, dtype, nan_poison):
    """x as a channels_last image batch, logits sliced out of a bigger tensor, and the
    upstream gradient expanded, as from nll.mean()."""
    select_path(interpret)
    x = torch.rand(3, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    logits = torch.randn(3, 5, 8, 8, device=device)[:, 1:4].detach().requires_grad_()
    check_against_oracle(x, logits, 1.3, torch.full((), 1 / 3, device=device).expand(3))


@on_interpreter
def test_pixel_nll_cpu_and_interpreter_agree():
    select_path(True)
    x = torch.rand(3, 3, 9, 11, requires_grad=True)
    logits = torch.randn(3, 3, 9, 11, requires_grad=True)
    grad_nll = torch.randn(3)
    results = []
    for path in (pytorch_path, contextlib.nullcontext):
        with path():
            nll = pixel_nll(x, logits, 0.7)
            results.append((nll,) + torch.autograd.grad(nll, (x, logits), grad_nll))
    for torch_path, interpreted in zip(*results):
        torch.testing.assert_close(interpreted, torch_path, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_pixel_nll_gradcheck_float64(interpret):
    select_path(interpret)
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, logits: pixel_nll(x, logits, 0.7), (x, logits))


def test_pixel_nll_floor_is_the_normalizer():
    """At x = mean the NLL is the constant N (log sigma + log(2 pi) / 2): 6909 nats for
    3x64x64 pixels at sigma 0.7 (docs/spec.md)."""
    logits = torch.randn(2, 3, 64, 64)
    nll = pixel_nll(torch.sigmoid(logits), logits, 0.7)
    floor = 3 * 64 * 64 * (math.log(0.7) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(nll, torch.full((2,), floor), rtol=1e-6, atol=1e-3)
    assert round(floor) == 6909


# ---------------------------------------------------------------------------------------
# NaN in, NaN out
# ---------------------------------------------------------------------------------------


@path_cases(dtypes=[torch.float32, torch.float16])
@pytest.mark.parametrize("where", ["x", "logits"])
def test_pixel_nll_nan_propagates(device, interpret, dtype, nan_poison, where):
    select_path(interpret)
    x = torch.rand(3, 2, 4, 4, dtype=dtype, device=device)
    logits = torch.randn(3, 2, 4, 4, dtype=dtype, device=device)
    (x if where == "x" else logits)[2, 1, 3, 0] = float("nan")
    x.requires_grad_()
    logits.requires_grad_()
    nll = pixel_nll(x, logits, 0.7)
    assert torch.isnan(nll[2]) and torch.isfinite(nll[:2]).all()
    grad_x, grad_logits = torch.autograd.grad(nll, (x, logits), torch.ones_like(nll))
    assert torch.isnan(grad_x[2, 1, 3, 0]) and torch.isnan(grad_logits[2, 1, 3, 0])
    assert torch.isfinite(grad_logits[:2]).all()


# ---------------------------------------------------------------------------------------
# Bad input: the error names the argument, the expected and the received
# ---------------------------------------------------------------------------------------


def _bad_nll_inputs():
    x, logits = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    other = torch.device("cuda" if torch.cuda.is_available() else "meta")
    return [
        ((torch.rand(2, 3, 4, 5), logits, 0.7), ValueError, r"x: expected shape \[2, 3, 4, 4\].*got \[2, 3, 4, 5\]"),
        ((x.half(), logits, 0.7), TypeError, r"x: expected dtype torch.float32.*got torch.float16"),
        ((x, logits.int(), 0.7), TypeError, r"logits: expected a floating-point tensor.*torch.int32"),
        ((x, torch.tensor(0.5), 0.7), ValueError, r"logits: expected at least 1 dims"),
        ((x.to(other), logits, 0.7), ValueError, rf"x: expected device cpu.*got {other.type}"),
        ((x, logits, 0.0), ValueError, r"sigma: expected a finite positive float, got 0.0"),
        ((x, logits, -0.7), ValueError, r"sigma: expected a finite positive float, got -0.7"),
        ((x, logits, float("nan")), ValueError, r"sigma: expected a finite positive float, got nan"),
        ((x, logits, float("inf")), ValueError, r"sigma: expected a finite positive float"),
        ((x, logits, torch.tensor([0.7])), ValueError, r"sigma: expected a 0-dim tensor"),
        ((x, logits, torch.tensor(1)), TypeError, r"sigma: expected a floating-point tensor"),
        ((x, logits, True), TypeError, r"sigma: expected a positive Python float, got bool"),
        ((x, logits, "0.7"), TypeError, r"sigma: expected a positive Python float, got str"),
    ]


@pytest.mark.parametrize("args,error,match", _bad_nll_inputs())
def test_pixel_nll_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        pixel_nll(*args)


def test_a_tensor_sigma_gives_the_float_sigmas_nll():
    """A 0-dim tensor sigma (a CUDA graph's, updated in place) is the float's value, bit for bit."""
    x, logits = torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for sigma in (0.7, 1.3):
        assert torch.equal(pixel_nll(x, logits, torch.tensor(sigma, dtype=torch.float64)), pixel_nll(x, logits, sigma))
    # A float32 sigma is its float32 value: close to the float's, not equal.
    torch.testing.assert_close(pixel_nll(x, logits, torch.tensor(0.7)), pixel_nll(x, logits, 0.7))


# ---------------------------------------------------------------------------------------
# torch.compile: one graph, no break, same values as eager, and no recompile as sigma anneals
# ---------------------------------------------------------------------------------------


def test_pixel_nll_compiles_without_graph_break_or_recompiles():
    select_path(False)  # eager and compiled: the CPU's PyTorch path
    from torch._dynamo.testing import CompileCounterWithBackend

    def loss(x, logits, sigma):
        return pixel_nll(x, logits * 1.5, sigma).mean()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    x = torch.rand(2, 3, 8, 8)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    for sigma in (2.0, 1.7, 1.3, 0.9, 0.7):
        out, out_ref = compiled(x, logits, sigma), loss(x, logits, sigma)
        (grad,), (grad_ref,) = torch.autograd.grad(out, logits), torch.autograd.grad(out_ref, logits)
        torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-7)
    # The first sigma is specialised, the second makes it symbolic; then no more compiles.
    assert counter.frame_count <= 2
