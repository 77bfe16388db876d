"""gqn_fast.kernels: where each op runs, and what every kernel test shares.

Paths: "cpu-torch" (CPU tensors, the PyTorch math), "cpu-interpreter" (CPU tensors, the
Triton kernels under Triton's interpreter: marked `interpreter`, they run in a pytest process
of their own with TRITON_INTERPRET=1, see conftest.py) and "cuda" (the compiled kernels:
marked `cuda`, skipped where no GPU exists, as in CI). The interpreter gets bf16 wrong, so it
runs fp32 and fp16 only. The op tests (test_kernels_*.py) import the parametrization and
helpers below.
"""

import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gqn_fast.kernels import (
    conv_cell,
    elementwise_gaussian_kl_from_sigma,
    gates,
    gaussian,
    lstm_gates,
    pixel_likelihood,
    pixel_nll,
    posterior_kl,
    posterior_sample_kl,
    use_triton,
)
from gqn_fast.kernels.utils import interpreter_enabled, pytorch_path
from helpers import RMS_LIMITS, rel_rms
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCounter  # noqa: E402

needs_gpu = pytest.mark.cuda  # conftest.py skips these where torch.cuda.is_available() is False
on_interpreter = pytest.mark.interpreter  # run by test_kernels_interpreter.py, in a process of their own

# The two CPU paths, as pytest params of `interpret`.
CPU_PATHS = [pytest.param(False, id="cpu-torch"), pytest.param(True, id="cpu-interpreter", marks=on_interpreter)]

_PATH_DTYPES = {
    ("cpu", False): (torch.float32, torch.float16, torch.bfloat16),
    ("cpu", True): (torch.float32, torch.float16),
    ("cuda", False): (torch.float32, torch.float16, torch.bfloat16),
}


def _path_id(device, interpret):
    return "cuda" if device == "cuda" else ("cpu-interpreter" if interpret else "cpu-torch")


def path_cases(dtypes=None):
    """pytest params (device, interpret, dtype) over every path and its dtypes."""
    cases = []
    for (device, interpret), path_dtypes in _PATH_DTYPES.items():
        for dtype in path_dtypes:
            if dtypes is not None and dtype not in dtypes:
                continue
            marks = [needs_gpu] if device == "cuda" else [on_interpreter] if interpret else []
            cases.append(
                pytest.param(
                    device, interpret, dtype, marks=marks, id=f"{_path_id(device, interpret)}-{str(dtype)[6:]}"
                )
            )
    return pytest.mark.parametrize("device,interpret,dtype", cases)


def select_path(interpret: bool) -> None:
    """Check that this process runs the path the test is for: the interpreter is chosen at
    import, and conftest.py sends each test to the process of its mode."""
    assert interpreter_enabled() == interpret, (
        "the interpreter tests run in their own process: TRITON_INTERPRET=1 python -m pytest -m interpreter"
        if interpret
        else "this test needs the PyTorch path: run it without TRITON_INTERPRET=1"
    )


# (device, interpret) for the tests that take every path in fp32.
OP_PATHS = [
    pytest.param("cpu", False, id="cpu-torch"),
    pytest.param("cpu", True, id="cpu-interpreter", marks=on_interpreter),
    pytest.param("cuda", False, id="cuda", marks=needs_gpu),
]


# Hypothesis with the function-scoped fixtures (nan_poison, monkeypatch): their state holds
# for every example of the test, which is what we want.
with_fixtures = settings(
    suppress_health_check=list(settings.default.suppress_health_check) + [HealthCheck.function_scoped_fixture]
)


def with_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout, as a leaf tensor."""
    if layout == "channels_last" and tensor.dim() == 4:
        out = tensor.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and tensor.dim() == 4:
        # Spatial dims that cannot merge into one stride: the wrapper copies these.
        out = tensor.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        # Every other element of a larger buffer: strided, no copy needed.
        big = torch.empty(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype, device=tensor.device)
        big[..., ::2] = tensor
        out = big[..., ::2]
    else:
        out = tensor.contiguous()
    assert torch.equal(out, tensor)
    return out.detach()


LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def random_values(shape, scale, extreme, extreme_fraction, generator, dtype, device, requires_grad=True):
    """randn * scale, with a random fraction of elements set to +-extreme; then cast."""
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if extreme_fraction > 0:
        pick = torch.rand(shape, generator=generator, dtype=torch.float64) < extreme_fraction
        sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0).double()
        values = torch.where(pick, extreme * sign, values)
    return values.to(dtype=dtype, device=device).requires_grad_(requires_grad)


class _Sigmoid64(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x) * torch.sigmoid(-x)


class _Tanh64(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / torch.cosh(x) ** 2


def sigmoid64(x: torch.Tensor) -> torch.Tensor:
    """torch.sigmoid for the float64 oracles, with its derivative in the tail-accurate form
    sigmoid(x) sigmoid(-x): autograd's sigmoid (1 - sigmoid) loses float64's relative
    precision at |x| ~ 30 (1 - sigmoid(30) ~ 1e-13), where the kernels don't."""
    return _Sigmoid64.apply(x)


def tanh64(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh for the float64 oracles, with derivative 1 / cosh^2 (see sigmoid64)."""
    return _Tanh64.apply(x)


def assert_matches_oracle(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """rel_rms(out, ref) within RMS_LIMITS of out's dtype, with two allowances for what out's
    dtype cannot hold: where the float64 reference overflows it (fp16 gradients through a
    tiny sigma) out must hold the same signed infinity, and the rest is compared; where the
    reference is so small that the dtype holds it only as subnormals or zero, an absolute
    error of the dtype's smallest normal number is allowed on top."""
    assert out.dtype != torch.float64 or ref.dtype == torch.float64
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}"
    limit = RMS_LIMITS[out.dtype]
    ref_rounded = ref.detach().to(out.dtype)
    overflow = torch.isinf(ref_rounded) & torch.isfinite(ref)
    if overflow.any():
        assert torch.equal(out[overflow], ref_rounded[overflow]), (
            f"{name}: should overflow {out.dtype} as the reference"
        )
        out, ref = out[~overflow], ref[~overflow]
        if out.numel() == 0:
            return
    err = rel_rms(out, ref)
    if err <= limit:
        return
    diff = (out.double() - ref.double()).pow(2).mean().sqrt().item()
    scale = ref.double().pow(2).mean().sqrt().item()
    floor = torch.finfo(out.dtype).tiny
    assert diff <= limit * scale + floor, (
        f"{name}: relative RMS error {err:.3g} exceeds {limit:.1g} "
        f"(absolute {diff:.3g} > {limit:.1g} * {scale:.3g} + {floor:.3g})"
    )


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_use_triton_follows_device_and_interpreter(interpret):
    cpu = torch.zeros(2)
    select_path(interpret)
    assert use_triton(cpu) == interpret
    with pytorch_path():
        assert not use_triton(cpu)
    assert use_triton(cpu) == interpret
    # FakeTensors (torch.compile's tracing) never go to the interpreter.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not use_triton(torch.zeros(2))
    if torch.cuda.is_available():
        assert use_triton(torch.zeros(2, device="cuda"))


def _public_op_calls(device):
    """{op name: (call(custom_op) -> outputs, inputs to differentiate)} for each public op that
    takes custom_op, on small inputs."""
    make = lambda *shape: torch.randn(*shape, device=device, requires_grad=True)  # noqa: E731
    preact, c, constant = make(2, 8, 3, 3), make(2, 2, 3, 3), make(2, 8, 3, 3)
    mu_q, s_q, mu_p, s_p, eps = (make(2, 3, 2, 2) for _ in range(5))
    sigma_q, sigma_p = (torch.rand(2, 3, device=device).add(0.5).requires_grad_() for _ in range(2))
    x, logits = torch.rand(2, 3, 4, 4, device=device), make(2, 3, 4, 4)
    return {
        "lstm_gates": (lambda op: lstm_gates(preact, c, constant, custom_op=op), (preact, c, constant)),
        "posterior_sample_kl": (
            lambda op: posterior_sample_kl(mu_q, s_q, mu_p, s_p, eps, custom_op=op),
            (mu_q, s_q, mu_p, s_p, eps),
        ),
        "posterior_kl": (lambda op: (posterior_kl(mu_q, s_q, mu_p, s_p, custom_op=op),), (mu_q, s_q, mu_p, s_p)),
        "elementwise_gaussian_kl_from_sigma": (
            lambda op: (
                elementwise_gaussian_kl_from_sigma(mu_q[:, :, 0, 0], sigma_q, s_p[:, :, 0, 0], sigma_p, custom_op=op),
            ),
            (mu_q, sigma_q, s_p, sigma_p),
        ),
        "pixel_nll": (lambda op: (pixel_nll(x, logits, 0.7, custom_op=op),), (logits,)),
    }


@pytest.mark.parametrize("device,interpret", OP_PATHS)
@pytest.mark.parametrize("name", list(_public_op_calls("cpu")))
def test_each_op_decides_its_path(device, interpret, name):
    """custom_op="always" runs the op's torch.library op on every path (its kernels, or on the
    CPU its PyTorch math); "auto" runs it only where the kernels run, and on the CPU's PyTorch
    path the op's PyTorch form through autograd: no custom op dispatched, the same values and
    gradients."""
    select_path(interpret)
    call, inputs = _public_op_calls(device)[name]
    results = {}
    for custom_op in ("always", "auto"):
        with OpCounter() as counter:
            outs = call(custom_op)
        results[custom_op] = outs + torch.autograd.grad(sum(out.sum() for out in outs), inputs)
        op_runs = custom_op == "always" or device == "cuda" or interpret
        assert dict(counter.custom) == ({name: 1} if op_runs else {}), (custom_op, dict(counter.custom))
    for always, auto in zip(results["always"], results["auto"]):
        torch.testing.assert_close(auto, always, rtol=1e-5, atol=1e-6)


def test_custom_op_is_checked():
    with pytest.raises(ValueError, match=r"custom_op: expected one of \('auto', 'always'\), got 'never'"):
        lstm_gates(torch.randn(2, 8), torch.randn(2, 2), custom_op="never")


@pytest.mark.parametrize("interpret", CPU_PATHS)
def test_kernels_match_the_mode_chosen_at_import(interpret):
    """@triton.jit and use_triton decide the mode from the same TRITON_INTERPRET, at import."""
    pytest.importorskip("triton")
    select_path(interpret)
    compiled = type(gates._lstm_gates_forward_kernel).__name__ == "JITFunction"
    assert compiled != interpret


@on_interpreter
def test_interpreter_and_pytorch_paths_in_one_process(monkeypatch):
    """Under the interpreter a call runs the interpreted kernel, inside pytorch_path() the
    PyTorch math, and then the kernel again: the same numbers each time."""
    from gqn_fast.kernels import lstm_gates

    select_path(True)
    preact, c = torch.randn(2, 8, 3, 3), torch.randn(2, 2, 3, 3)
    calls = []
    real_wrap = gates.wrap_triton

    def spy(kernel):
        calls.append(kernel)
        return real_wrap(kernel)

    monkeypatch.setattr(gates, "wrap_triton", spy)
    outs = [lstm_gates(preact, c)]
    with pytorch_path():
        outs.append(lstm_gates(preact, c))
    outs.append(lstm_gates(preact, c))
    assert calls == [gates._lstm_gates_forward_kernel] * 2
    for h, c_new in outs[1:]:
        assert torch.allclose(h, outs[0][0], rtol=1e-6, atol=1e-7)
        assert torch.allclose(c_new, outs[0][1], rtol=1e-6, atol=1e-7)


def test_kernels_import_and_run_without_triton():
    """Where Triton is missing (it ships for Linux only) the ops still import and run on the CPU."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import logging; logging.disable(logging.WARNING)\n"
        "import torch\n"
        "from gqn_fast.kernels import lstm_gates, posterior_sample_kl, pixel_nll, use_triton\n"
        "p = torch.randn(2, 8, 3, 3, requires_grad=True)\n"
        "h, c = lstm_gates(p, torch.randn(2, 2, 3, 3)); (h.sum() + c.sum()).backward()\n"
        "z, kl = posterior_sample_kl(*[torch.randn(2, 3) for _ in range(5)])\n"
        "nll = pixel_nll(torch.rand(2, 3), torch.randn(2, 3), 0.7)\n"
        "assert not use_triton(p) and torch.isfinite(p.grad).all() and kl.shape == nll.shape == (2,)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# The kernels compile for a GPU (sm_90) even where none exists: Triton's frontend and the
# NVIDIA backend run on the CPU. The interpreter accepts some code the compiler rejects.
# ---------------------------------------------------------------------------------------


def _nvidia_compiler_available() -> bool:
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return False
    nvidia = backends.get("nvidia")
    if nvidia is None:
        return False
    ptxas = Path(inspect.getfile(nvidia.compiler)).parent / "bin" / "ptxas"
    return ptxas.exists() and hasattr(triton, "compile")


_GATES_TILE = {"BLOCK_C": 4, "BLOCK_S": 128}
_CONV_GATES = {"KSIZE_Y": 5, "KSIZE_X": 3, "UPCAST": False}
# (kernel, constexprs, element type of the input pointers): the low-precision input path
# (bf16: load, upcast, round), and for the conv kernels also fp32 operands on TF32 tensor cores.
_KERNEL_VARIANTS = [
    (gates._lstm_gates_forward_kernel, {**_GATES_TILE, "HAS_CONSTANT": False}, "bf16"),
    (gates._lstm_gates_forward_kernel, {**_GATES_TILE, "HAS_CONSTANT": True}, "bf16"),
    (gates._lstm_gates_backward_kernel, {**_GATES_TILE, "HAS_CONSTANT": False}, "bf16"),
    (gates._lstm_gates_backward_kernel, {**_GATES_TILE, "HAS_CONSTANT": True}, "bf16"),
    (gaussian._posterior_kl_forward_kernel, {**_GATES_TILE, "HAS_SAMPLE": True}, "bf16"),
    (gaussian._posterior_kl_forward_kernel, {**_GATES_TILE, "HAS_SAMPLE": False}, "bf16"),
    (gaussian._posterior_kl_backward_kernel, {**_GATES_TILE, "HAS_SAMPLE": True}, "bf16"),
    (gaussian._posterior_kl_backward_kernel, {**_GATES_TILE, "HAS_SAMPLE": False}, "bf16"),
    (gaussian._elementwise_kl_forward_kernel, _GATES_TILE, "bf16"),
    (gaussian._elementwise_kl_backward_kernel, _GATES_TILE, "bf16"),
    (pixel_likelihood._pixel_nll_forward_kernel, _GATES_TILE, "bf16"),
    (pixel_likelihood._pixel_nll_backward_kernel, _GATES_TILE, "bf16"),
] + [
    (kernel, {**_CONV_GATES, **extra, **tile, "DOT_PRECISION": precision}, element)
    for element, precision in (("bf16", "ieee"), ("fp32", "tf32"))
    for kernel, extra, tile in (
        (
            conv_cell._conv_lstm_cell_forward_kernel,
            {"SAVE_PREACT": True, "GATES_IN_ONE_DOT": False},
            {"BLOCK_M": 64, "BLOCK_H": 32, "BLOCK_K": 32},
        ),
        (
            conv_cell._conv_lstm_cell_forward_kernel,
            {"SAVE_PREACT": True, "GATES_IN_ONE_DOT": True},
            {"BLOCK_M": 64, "BLOCK_H": 32, "BLOCK_K": 32},
        ),
        (conv_cell._conv_input_grad_kernel, {}, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}),
        (conv_cell._conv_weight_grad_kernel, {}, {"BLOCK_N": 64, "BLOCK_C": 64, "BLOCK_M": 32}),
    )
]


@pytest.mark.skipif(not _nvidia_compiler_available(), reason="Triton's NVIDIA compiler (with ptxas) is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")  # Triton 3.9's notice of a future default
@pytest.mark.parametrize(
    "kernel,constexprs,element",
    _KERNEL_VARIANTS,
    ids=[
        f"{k.fn.__name__}-{e}{sorted((n, v) for n, v in c.items() if not n.startswith('BLOCK'))}"
        for k, c, e in _KERNEL_VARIANTS
    ],
)
def test_kernel_compiles_for_sm90(kernel, constexprs, element):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Sizes the conv kernels take as tl.constexpr (their loop bounds): a GQN core's.
    shapes = {"batch": 8, "cin": 384, "cout": 512, "height": 16, "width": 16}
    constexprs = {
        **{p.name: shapes[p.name] for p in kernel.params if p.is_constexpr and p.name in shapes},
        **constexprs,
    }
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("grad_kl_ptr", "grad_nll_ptr", "kl_partial_ptr", "nll_partial_ptr", "preact_ptr"):
            signature[name] = "*fp32"  # per-sample sums, their gradients and saved preactivations are fp32
        elif name == "sigma_ptr":
            signature[name] = "*fp64"
        elif name.endswith("_ptr"):
            signature[name] = f"*{element}"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert "st.global" in ptx
    if kernel.fn.__module__.endswith("conv_cell"):  # the GEMMs run on Hopper's tensor cores
        assert "wgmma" in ptx
    if "GATES_IN_ONE_DOT" in constexprs:  # one product per gate, or one as wide as all four
        widths = {int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)}
        expected = constexprs["BLOCK_H"] * (4 if constexprs["GATES_IN_ONE_DOT"] else 1)
        assert widths == {expected}, f"wgmma widths {sorted(widths)}, expected {expected}"


def test_every_kernel_is_in_the_compile_check():
    kernels = {
        value
        for module in (conv_cell, gates, gaussian, pixel_likelihood)
        for name, value in vars(module).items()
        if name.endswith("_kernel") and hasattr(value, "fn")
    }
    assert len(kernels) == 11
    assert kernels == {kernel for kernel, _, _ in _KERNEL_VARIANTS}


def test_triton_op_finds_the_kernels():
    """torch.compile's cache key holds the kernels triton_op finds in each op's source."""
    from torch._library.triton import get_triton_kernels_for_op

    if type(gates._lstm_gates_forward_kernel).__name__ != "JITFunction":
        pytest.skip("no compiled kernels: Triton is missing, or TRITON_INTERPRET=1 was set at import")
    found = {
        name: {k.fn.__name__ for k in get_triton_kernels_for_op(f"gqn_fast::{name}")}
        for name in (
            "lstm_gates",
            "posterior_sample_kl",
            "pixel_nll_backward",
            "conv_lstm_cell",
            "conv_lstm_cell_backward",
        )
    }
    assert found == {
        "conv_lstm_cell": {"_conv_lstm_cell_forward_kernel"},
        # The gate backward and the two Triton convs (the tuned and interpreted launch the same kernel).
        "conv_lstm_cell_backward": {
            "_lstm_gates_backward_kernel",
            "_conv_input_grad_kernel",
            "_conv_weight_grad_kernel",
        },
        "lstm_gates": {"_lstm_gates_forward_kernel"},
        "posterior_sample_kl": {"_posterior_kl_forward_kernel"},
        "pixel_nll_backward": {"_pixel_nll_backward_kernel"},
    }


def test_autotune_budget_bounds_the_configurations(monkeypatch):
    """GQN_FAST_AUTOTUNE_CONFIGS=N keeps the first N configurations: every tile, 3 stages, 4 warps."""
    pytest.importorskip("triton")
    tiles = ((32, 32, 32), (64, 16, 32), (64, 32, 64))
    tune = lambda: conv_cell._autotuned(
        conv_cell._conv_lstm_cell_forward_kernel,
        ("BLOCK_M", "BLOCK_H", "BLOCK_K"),
        tiles,
        ("hidden", "GATES_IN_ONE_DOT"),
    )  # noqa: E731
    monkeypatch.delenv("GQN_FAST_AUTOTUNE_CONFIGS", raising=False)
    assert len(tune().configs) == 3 * len(tiles)
    monkeypatch.setenv("GQN_FAST_AUTOTUNE_CONFIGS", "2")
    configs = tune().configs
    assert [(c.kwargs["BLOCK_M"], c.num_stages, c.num_warps) for c in configs] == [(32, 3, 4), (64, 3, 4)]
    monkeypatch.setenv("GQN_FAST_AUTOTUNE_CONFIGS", "0")
    with pytest.raises(ValueError, match="GQN_FAST_AUTOTUNE_CONFIGS: expected a positive int, got '0'"):
        tune()


def test_tile_shape_is_bounded_and_follows_the_contiguous_dim():
    from gqn_fast.kernels.utils import tile_shape

    for channels in (1, 3, 7, 128, 512):
        for space in (1, 5, 256, 4096):
            for contiguous in (False, True):
                block_c, block_s = tile_shape(channels, space, contiguous)
                assert block_c * block_s <= 1024 and math.log2(block_c).is_integer() and math.log2(block_s).is_integer()
    assert tile_shape(128, 256, channels_contiguous=True)[0] == 128
    assert tile_shape(128, 256, channels_contiguous=False)[1] == 256


# ---------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake (meta) implementation, autograd registration and
# AOT dispatch of every op, forward and backward
# ---------------------------------------------------------------------------------------


def _op_cases(device):
    ops = torch.ops.gqn_fast
    make = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    preact, c = make(2, 8, 3, 3), make(2, 2, 3, 3)
    params = [make(2, 3, 2, 2) for _ in range(5)]
    x, logits = torch.rand(2, 3, 4, 4, device=device), make(2, 3, 4, 4)
    sigma = torch.tensor(0.7, dtype=torch.float64, device=device)
    grad = lambda *args: tuple(t.detach().requires_grad_() for t in args)  # noqa: E731
    return [
        (ops.lstm_gates.default, grad(preact, c) + (None,)),
        (ops.lstm_gates.default, grad(preact, c, make(2, 8, 3, 3))),
        (ops.posterior_sample_kl.default, grad(*params)),
        (ops.posterior_kl.default, grad(*params[:4])),
        (ops.pixel_nll.default, grad(x, logits) + (sigma,)),
        (ops.lstm_gates_backward.default, (preact, c, make(2, 2, 3, 3), make(2, 2, 3, 3), None)),
        (ops.lstm_gates_backward.default, (preact, c, make(2, 2, 3, 3), make(2, 2, 3, 3), make(2, 8, 3, 3))),
        (ops.posterior_sample_kl_backward.default, (*params, make(2, 3, 2, 2), make(2))),
        (ops.posterior_kl_backward.default, (*params[:4], make(2))),
        (ops.pixel_nll_backward.default, (x, logits, sigma, make(2))),
    ]


def _op_case_ids():
    ids = []
    for op, args in _op_cases("cpu"):
        name = str(op).split(".")[1]
        ids.append(name + ("-constant" if name.startswith("lstm_gates") and args[-1] is not None else ""))
    return ids


@pytest.mark.parametrize("device,interpret", OP_PATHS)
@pytest.mark.parametrize("index", range(len(_op_case_ids())), ids=_op_case_ids())
def test_opcheck(device, interpret, index):
    select_path(interpret)
    op, args = _op_cases(device)[index]
    torch.library.opcheck(op, args)
