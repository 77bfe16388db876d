"""gqn_fast.kernels.lstm_gates against a float64 oracle, on every path (test_kernels_dispatch)."""

import contextlib

import pytest
import torch
from gqn_fast.kernels import lstm_gates
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
    tanh64,
    with_fixtures,
    with_layout,
)

# ---------------------------------------------------------------------------------------
# The oracle: the ConvLSTM gate math in float64 autograd (sigmoid64 / tanh64: see there).
# ---------------------------------------------------------------------------------------


def gates_oracle(preact, c):
    i, f, g, o = preact.double().chunk(4, dim=1)
    c_new = sigmoid64(f) * c.double() + sigmoid64(i) * tanh64(g)
    h = sigmoid64(o) * tanh64(c_new)
    return h, c_new


def check_against_oracle(preact, c, grad_h, grad_c_new, constant=None):
    """lstm_gates(preact, c[, constant]) and its gradients against the oracle of preact + constant."""
    h, c_new = lstm_gates(preact, c, constant)
    assert h.dtype == c_new.dtype == c.dtype and h.shape == c_new.shape == c.shape
    inputs = (preact, c) if constant is None else (preact, c, constant)
    grads = torch.autograd.grad((h, c_new), inputs, (grad_h, grad_c_new))
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    preact64 = inputs64[0] if constant is None else inputs64[0] + inputs64[2]
    h_ref, c_new_ref = gates_oracle(preact64, inputs64[1])
    grads_ref = torch.autograd.grad((h_ref, c_new_ref), inputs64, (grad_h.double(), grad_c_new.double()))
    assert_matches_oracle(h, h_ref, "h")
    assert_matches_oracle(c_new, c_new_ref, "c_new")
    for name, grad, grad_ref, given_input in zip(["grad preact", "grad c", "grad constant"], grads, grads_ref, inputs):
        assert grad.dtype == given_input.dtype, f"{name}: {grad.dtype}, its input's {given_input.dtype}"
        if name == "grad constant":  # it is preact's gradient: held to preact's precision
            grad = grad.to(preact.dtype)
        assert_matches_oracle(grad, grad_ref, name)
    return h, c_new


# ---------------------------------------------------------------------------------------
# Outputs and gradients, drawn shapes, values (extremes of +-30 included) and layouts
# ---------------------------------------------------------------------------------------


@path_cases()
@with_fixtures
@given(
    batch=st.integers(1, 4),
    hidden=st.integers(1, 9),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    scale=st.sampled_from([1e-3, 1.0, 5.0]),
    extreme_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    layout=st.sampled_from(LAYOUTS),
    with_constant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lstm_gates_matches_float64_oracle(
    device, interpret, dtype, nan_poison, batch, hidden, height, width, scale, extreme_fraction, layout,
    with_constant, seed,
):  # fmt: skip
    select_path(interpret)
    gen = torch.Generator().manual_seed(seed)
    draw = lambda channels, extreme: random_values(  # noqa: E731
        (batch, channels, height, width), scale, extreme, extreme_fraction, gen, dtype, device, requires_grad=False
    )
    preact = with_layout(draw(4 * hidden, 30.0), layout).requires_grad_()
    c = with_layout(draw(hidden, 30.0), layout).requires_grad_()
    grad_h, grad_c_new = draw(hidden, 1.0), draw(hidden, 1.0)
    # A constant added to preact in the kernel's pass (in NCHW whatever preact's layout: the
    # two are read with their own strides); its extremes meet preact's in the sum.
    constant = draw(4 * hidden, 30.0).requires_grad_() if with_constant else None
    h, _ = check_against_oracle(preact, c, grad_h, grad_c_new, constant)
    if layout == "channels_last" and c.is_contiguous(memory_format=torch.channels_last):
        assert h.is_contiguous(memory_format=torch.channels_last)


@path_cases(dtypes=[torch.float32])
@pytest.mark.parametrize(
    "shape",
    [(3, 5), (2, 7, 1, 1), (1, 3, 2, 3, 4)],  # no spatial dims, 1x1, two spatial dims and more
    ids=["2d", "1x1", "5d"],
)
def test_lstm_gates_any_rank(device, interpret, dtype, nan_poison, shape):
    select_path(interpret)
    c = torch.randn(shape, device=device, requires_grad=True)
    preact = torch.randn((shape[0], 4 * shape[1], *shape[2:]), device=device, requires_grad=True)
    check_against_oracle(preact, c, torch.randn_like(c), torch.randn_like(c))


@path_cases(dtypes=[torch.float16, torch.bfloat16])
def test_lstm_gates_narrow_preact_beside_fp32_state(device, interpret, dtype, nan_poison):
    """Under autocast a cell's conv gives bf16 preactivations beside an fp32 cell state: the op
    reads them as they are (no fp32 copy first) and matches the oracle of their values; h and c'
    are fp32 (c's dtype), each gradient in its own input's dtype, the constant's in either."""
    select_path(interpret)
    preact = (torch.randn(2, 4 * 3, 4, 5, device=device) * 3).to(dtype).requires_grad_()
    c = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    grad_h, grad_c_new = torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 5, device=device)
    for constant_dtype in (None, dtype, torch.float32):
        constant = None if constant_dtype is None else torch.randn(2, 4 * 3, 4, 5, device=device).to(constant_dtype)
        constant = None if constant is None else constant.requires_grad_()
        h, c_new = check_against_oracle(preact, c, grad_h, grad_c_new, constant)
        assert h.dtype == c_new.dtype == torch.float32


@path_cases(dtypes=[torch.float32])
def test_lstm_gates_odd_strides(device, interpret, dtype, nan_poison):
    """Expanded (stride 0) and sliced inputs and gradients, and preact as a slice of a bigger
    conv output, as the model's chunked tensors are."""
    select_path(interpret)
    conv_out = torch.randn(2, 4 * 3 + 5, 4, 6, device=device)
    preact = conv_out[:, 5:].detach().requires_grad_()
    c = torch.randn(3, 1, 1, device=device).expand(2, 3, 4, 6).detach().requires_grad_()
    grad_h = torch.randn(1, 3, 4, 1, device=device).expand(2, 3, 4, 6)
    grad_c_new = torch.randn(2, 3, 4, 12, device=device)[..., ::2]
    check_against_oracle(preact, c, grad_h, grad_c_new)
    # A constant shared by the batch (stride 0), as a bias or a step's hoisted input can be.
    constant = torch.randn(1, 4 * 3, 4, 6, device=device).expand(2, -1, -1, -1).detach().requires_grad_()
    check_against_oracle(preact, c, grad_h, grad_c_new, constant)


@on_interpreter
def test_lstm_gates_cpu_and_interpreter_agree():
    select_path(True)
    preact = torch.randn(3, 4 * 6, 5, 7, requires_grad=True)
    c = torch.randn(3, 6, 5, 7, requires_grad=True)
    grads_out = (torch.randn(3, 6, 5, 7), torch.randn(3, 6, 5, 7))
    results = []
    for path in (pytorch_path, contextlib.nullcontext):
        with path():
            outs = lstm_gates(preact, c)
            results.append(outs + torch.autograd.grad(outs, (preact, c), grads_out))
    for torch_path, interpreted in zip(*results):
        torch.testing.assert_close(interpreted, torch_path, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_lstm_gates_gradcheck_float64(interpret):
    select_path(interpret)
    preact = torch.randn(2, 4 * 2, 2, 1, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 2, 1, dtype=torch.float64, requires_grad=True)
    constant = torch.randn(2, 4 * 2, 2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lstm_gates, (preact, c))
    assert torch.autograd.gradcheck(lstm_gates, (preact, c, constant))


def test_lstm_gates_empty_batch():
    h, c_new = lstm_gates(torch.randn(0, 8, 3, 3), torch.randn(0, 2, 3, 3))
    assert h.shape == c_new.shape == (0, 2, 3, 3)


# ---------------------------------------------------------------------------------------
# NaN in, NaN out
# ---------------------------------------------------------------------------------------


@path_cases(dtypes=[torch.float32, torch.float16])
@pytest.mark.parametrize("where", ["i", "f", "g", "o", "c"])
def test_lstm_gates_nan_propagates(device, interpret, dtype, nan_poison, where):
    select_path(interpret)
    hidden = 3
    preact = torch.randn(2, 4 * hidden, 3, 3, dtype=dtype, device=device)
    c = torch.randn(2, hidden, 3, 3, dtype=dtype, device=device)
    if where == "c":
        c[1, 2, 0, 1] = float("nan")
    else:
        preact[1, "ifgo".index(where) * hidden + 2, 0, 1] = float("nan")
    preact.requires_grad_()
    c.requires_grad_()
    h, c_new = lstm_gates(preact, c)
    # o only reaches h; everything else reaches c' and, through it, h.
    assert torch.isnan(h[1, 2, 0, 1])
    assert torch.isnan(c_new[1, 2, 0, 1]) == (where != "o")
    nan = torch.zeros_like(h, dtype=torch.bool)
    nan[1, 2, 0, 1] = True
    assert torch.isfinite(h[~nan]).all() and torch.isfinite(c_new[~nan]).all()
    grad_preact, grad_c = torch.autograd.grad((h, c_new), (preact, c), (torch.ones_like(h), torch.ones_like(c)))
    assert torch.isnan(grad_preact[1, 2::hidden, 0, 1]).any() and torch.isnan(grad_c[1, 2, 0, 1])


# ---------------------------------------------------------------------------------------
# Bad input: the error names the argument, the expected and the received
# ---------------------------------------------------------------------------------------


def _bad_gates_inputs():
    p, c = torch.randn(2, 8, 3, 3), torch.randn(2, 2, 3, 3)
    cases = [
        ((torch.randn(2, 7, 3, 3), torch.randn(2, 2, 3, 3)), ValueError, r"preact: .*4\*H.*got 7"),
        ((p, torch.randn(2, 3, 3, 3)), ValueError, r"c: expected shape \[2, 2, 3, 3\].*got \[2, 3, 3, 3\]"),
        ((p, torch.randn(3, 2, 3, 3)), ValueError, r"c: expected shape"),
        ((p, torch.randn(2, 2, 3, 4)), ValueError, r"c: expected shape"),
        ((torch.randn(8), c), ValueError, r"preact: expected at least 2 dims"),
        (
            (p, c.double()),
            TypeError,
            r"c: expected dtype float32, float16 or bfloat16 \(as preact is torch.float32.*got torch.float64",
        ),
        (
            (p.double(), c),
            TypeError,
            r"c: expected dtype torch.float64 \(as preact is torch.float64.*got torch.float32",
        ),
        ((p.long(), c), TypeError, r"preact: expected a floating-point tensor.*torch.int64"),
        ((p, c.int()), TypeError, r"c: expected a floating-point tensor.*torch.int32"),
        (
            (p, c, torch.randn(2, 8, 3)),
            ValueError,
            r"constant: expected shape \[2, 8, 3, 3\] \(from preact\), got \[2, 8, 3\]",
        ),
        ((p, c, p.double()), TypeError, r"constant: expected dtype float32, float16 or bfloat16 .*got torch.float64"),
    ]
    if torch.cuda.is_available():
        cases.append(((p, c.cuda()), ValueError, r"c: expected device cpu.*got cuda"))
    else:
        cases.append(((p, c.to("meta")), ValueError, r"c: expected device cpu.*got meta"))
    return cases


@pytest.mark.parametrize("args,error,match", _bad_gates_inputs())
def test_lstm_gates_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        lstm_gates(*args)


# ---------------------------------------------------------------------------------------
# torch.compile: one graph, no break, same values as eager
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inductor's own import
def test_lstm_gates_compiles_without_graph_break(backend):
    select_path(False)  # eager and compiled: the CPU's PyTorch path

    def step(preact, c):
        h, c_new = lstm_gates(preact * 2.0, c)
        h2, _ = lstm_gates(preact, c_new, preact.detach() * 0.5)  # with a constant, twice the graph
        return (h * c_new).sum() + h.square().sum() + h2.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    preact = torch.randn(2, 4 * 5, 3, 4, requires_grad=True)
    c = torch.randn(2, 5, 3, 4, requires_grad=True)
    out = compiled(preact, c)
    grads = torch.autograd.grad(out, (preact, c))
    out_ref = step(preact, c)
    grads_ref = torch.autograd.grad(out_ref, (preact, c))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
