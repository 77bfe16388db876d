"""A ConvLSTM cell's convolution and gates in one kernel: an implicit-GEMM Ky x Kx convolution
(stride 1, "same" padding, odd sizes) whose epilogue applies the gate math, so the [B, 4H, Y, X]
preactivation tensor is never written to memory and read back between the two.

    preact = conv2d(x, weight, padding=(Ky // 2, Kx // 2)) + constant  # constant: bias and the
    i, f, g, o = preact.chunk(4, dim=1)                          # inputs hoisted out of the loop
    c' = sigmoid(f) c + sigmoid(i) tanh(g);   h = sigmoid(o) tanh(c')

The GEMM view: rows are output pixels (M = B Y X), columns hidden channels (one column tile
gathers the same hidden channels of all four gates, so the epilogue has i, f, g, o side by
side), and the reduction runs over the Ky x Kx taps and the input channels. No im2col buffer:
each tap's A tile is loaded from x at shifted pixels, zero outside the image.

Backward. The gate backward (seven loads and about ten exponentials per element) is not fused
into the backward convolutions: their prologue would redo it once per tap and channel tile,
150 times for the inference core, where its exponentials would take about 2.5 times the GEMM's
tensor-core time on an H100.
So the forward saves the fp32 preactivations when autograd needs them, the fused
gate-backward kernel (gates.py) writes grad_preact once, and two convolutions read it: Triton
implicit-GEMM kernels (backward_convs="triton") or cuDNN through aten.convolution_backward
("aten"). Which is faster is for `bench/run.py --only conv_cell` to say on a GPU; "aten" is
the default.

Memory layout: the weight is read through a (K, K, C, 4H) copy, so the tiles of each tap are
rows of adjacent output channels (see _output_channels_unit_stride); the weight gradient is
written contiguous, once per tile. x may have any strides;
channels_last x lets the compiler vectorise the A tiles along the reduction (and, for bf16,
pipeline them with cp.async, which needs 4-byte pieces), NCHW x coalesces them along pixels.

Precision: the operands of every GEMM are x's dtype (fp32 runs as TF32 on tensor cores when
torch.backends.cudnn.allow_tf32 is on, as cuDNN's convolutions do; bf16 and fp16 as they
are), accumulation is fp32; the gate math and the saved preactivations are fp32; h and c'
take c's dtype. fp64 inputs (gradcheck) run the PyTorch path.

Layout: kernels, autotune configurations, host functions, then the torch.library ops.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .gates import lstm_gates_backward, lstm_gates_torch
from .utils import (
    HAS_TRITON,
    accurate_tanh,
    check_floating,
    compute_dtype,
    interpreter_enabled,
    launch_device,
    tl,
    triton,
    use_triton,
    wrap_triton,
)

BACKWARD_CONVS = ("aten", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 (gradcheck) runs the PyTorch path


def _check_backward_convs(backward_convs: str) -> None:
    if backward_convs not in BACKWARD_CONVS:
        raise ValueError(f"backward_convs: expected one of {BACKWARD_CONVS}, got {backward_convs!r}")


# ---------------------------------------------------------------------------------------
# Triton kernels. Every tensor is [batch, channel, row, column] with arbitrary strides
# (contiguous, channels_last, slices, expanded batch), addressed in int64.
# ---------------------------------------------------------------------------------------


@triton.jit
def _pixel_coordinates(pid, batch, height, width, BLOCK_M: tl.constexpr):
    """The BLOCK_M output pixels of row tile `pid`: (b, y, x, in-range mask), each [BLOCK_M]."""
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    space = height * width
    b = (m // space).to(tl.int64)
    y = (m % space) // width
    x = m % width
    return b, y, x, m < batch * space


@triton.jit
def _shifted_pixels(b, y, x, m_ok, dy, dx, height, width, stride_b, stride_y, stride_x):
    """Where a tap reads: the offsets (int64) of pixels (y + dy, x + dx) of samples b in a tensor
    of these strides, and which of them fall inside the height x width image (the zero padding
    outside is a masked load). The three kernels' taps, written once."""
    ys = y + dy
    xs = x + dx
    inside = m_ok & (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    return b * stride_b + ys.to(tl.int64) * stride_y + xs.to(tl.int64) * stride_x, inside


@triton.jit
def _conv_lstm_cell_forward_kernel(
    x_ptr, w_ptr, const_ptr, c_ptr, h_ptr, c_new_ptr, preact_ptr,
    batch, cin: tl.constexpr, hidden, height, width,
    x_sb, x_sc, x_sy, x_sx,
    w_sn, w_sc, w_sy, w_sx,
    const_sb, const_sc, const_sy, const_sx,
    c_sb, c_sc, c_sy, c_sx,
    h_sb, h_sc, h_sy, h_sx,
    c_new_sb, c_new_sc, c_new_sy, c_new_sx,
    preact_sb, preact_sc, preact_sy, preact_sx,
    KSIZE_Y: tl.constexpr, KSIZE_X: tl.constexpr, SAVE_PREACT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    GATES_IN_ONE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (pixel tiles, hidden tiles): h and c' for BLOCK_M pixels x BLOCK_H hidden channels.

    GATES_IN_ONE_DOT: one [BLOCK_M, 4 BLOCK_H] product per reduction step, its columns the four
    gates of each hidden channel side by side (column 4 h + gate), split in the epilogue; else
    four [BLOCK_M, BLOCK_H] products, one per gate. Hopper's wgmma runs N = 64 to 256 columns
    at full rate, so four narrow products may leave the tensor cores idle: bench/run.py --only
    conv_cell measures both (conv_lstm_cell's gates_in_one_dot picks).
    """
    b, y, x, m_ok = _pixel_coordinates(tl.program_id(0), batch, height, width, BLOCK_M)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hh < hidden
    if GATES_IN_ONE_DOT:
        column = tl.arange(0, 4 * BLOCK_H)
        column_h = tl.program_id(1) * BLOCK_H + column // 4
        # Weight rows of each column: gate (column % 4, PyTorch's order i, f, g, o), hidden channel.
        w_rows = ((column % 4) * hidden + column_h).to(tl.int64)[None, :] * w_sn
        column_ok = column_h < hidden
        acc = tl.zeros((BLOCK_M, 4 * BLOCK_H), dtype=tl.float32)
    else:
        # Weight rows of the four gates for these hidden channels (PyTorch's order i, f, g, o).
        w_rows_i = hh.to(tl.int64)[None, :] * w_sn
        w_rows_f = (hh + hidden).to(tl.int64)[None, :] * w_sn
        w_rows_g = (hh + 2 * hidden).to(tl.int64)[None, :] * w_sn
        w_rows_o = (hh + 3 * hidden).to(tl.int64)[None, :] * w_sn
        acc_i = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        acc_f = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    chunks = tl.cdiv(cin, BLOCK_K)
    # One loop over (tap, channel chunk): Triton software-pipelines innermost loops only.
    for step in range(KSIZE_Y * KSIZE_X * ((cin + BLOCK_K - 1) // BLOCK_K)):  # constexpr bound: see _INTERPRETER_CONFIG
        tap = step // chunks
        k0 = (step % chunks) * BLOCK_K
        ky = tap // KSIZE_X
        kx = tap % KSIZE_X
        x_pixels, inside = _shifted_pixels(
            b, y, x, m_ok, ky - KSIZE_Y // 2, kx - KSIZE_X // 2, height, width, x_sb, x_sy, x_sx
        )
        w_tap = ky * w_sy + kx * w_sx
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < cin
        a = tl.load(x_ptr + x_pixels[:, None] + k.to(tl.int64)[None, :] * x_sc, mask=inside[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        w_ptrs = w_ptr + w_tap + k.to(tl.int64)[:, None] * w_sc
        if UPCAST:  # the interpreter multiplies bf16 tiles wrongly; their values are exact in fp32
            a = a.to(tl.float32)
        if GATES_IN_ONE_DOT:
            w = tl.load(w_ptrs + w_rows, mask=k_ok[:, None] & column_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        else:
            w_mask = k_ok[:, None] & h_ok[None, :]
            w_i = tl.load(w_ptrs + w_rows_i, mask=w_mask, other=0.0)
            w_f = tl.load(w_ptrs + w_rows_f, mask=w_mask, other=0.0)
            w_g = tl.load(w_ptrs + w_rows_g, mask=w_mask, other=0.0)
            w_o = tl.load(w_ptrs + w_rows_o, mask=w_mask, other=0.0)
            if UPCAST:
                w_i, w_f, w_g, w_o = w_i.to(tl.float32), w_f.to(tl.float32), w_g.to(tl.float32), w_o.to(tl.float32)
            acc_i = tl.dot(a, w_i, acc_i, input_precision=DOT_PRECISION)
            acc_f = tl.dot(a, w_f, acc_f, input_precision=DOT_PRECISION)
            acc_g = tl.dot(a, w_g, acc_g, input_precision=DOT_PRECISION)
            acc_o = tl.dot(a, w_o, acc_o, input_precision=DOT_PRECISION)
    if GATES_IN_ONE_DOT:
        # Column 4 h + 2 p + q holds gate 2 p + q: split q (i and g, f and o), then p.
        even, odd = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_H, 2, 2)))
        acc_i, acc_g = tl.split(even)
        acc_f, acc_o = tl.split(odd)

    # Epilogue: the gate math of gates.py on the accumulators, plus the constant share.
    mask = m_ok[:, None] & h_ok[None, :]
    y64 = y.to(tl.int64)[:, None]
    x64 = x.to(tl.int64)[:, None]
    ch = hh.to(tl.int64)[None, :]
    ch_f = (hh + hidden).to(tl.int64)[None, :]
    ch_g = (hh + 2 * hidden).to(tl.int64)[None, :]
    ch_o = (hh + 3 * hidden).to(tl.int64)[None, :]
    b2 = b[:, None]
    const = const_ptr + b2 * const_sb + y64 * const_sy + x64 * const_sx
    a_i = acc_i + tl.load(const + ch * const_sc, mask=mask, other=0.0).to(tl.float32)
    a_f = acc_f + tl.load(const + ch_f * const_sc, mask=mask, other=0.0).to(tl.float32)
    a_g = acc_g + tl.load(const + ch_g * const_sc, mask=mask, other=0.0).to(tl.float32)
    a_o = acc_o + tl.load(const + ch_o * const_sc, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + b2 * c_sb + ch * c_sc + y64 * c_sy + x64 * c_sx, mask=mask, other=0.0).to(tl.float32)
    c_new = tl.sigmoid(a_f) * c + tl.sigmoid(a_i) * accurate_tanh(a_g)
    h = tl.sigmoid(a_o) * accurate_tanh(c_new)
    h_out = h_ptr + b2 * h_sb + ch * h_sc + y64 * h_sy + x64 * h_sx
    tl.store(h_out, h.to(h_ptr.dtype.element_ty), mask=mask)
    c_new_out = c_new_ptr + b2 * c_new_sb + ch * c_new_sc + y64 * c_new_sy + x64 * c_new_sx
    tl.store(c_new_out, c_new.to(c_new_ptr.dtype.element_ty), mask=mask)
    if SAVE_PREACT:
        preact = preact_ptr + b2 * preact_sb + y64 * preact_sy + x64 * preact_sx
        tl.store(preact + ch * preact_sc, a_i, mask=mask)
        tl.store(preact + ch_f * preact_sc, a_f, mask=mask)
        tl.store(preact + ch_g * preact_sc, a_g, mask=mask)
        tl.store(preact + ch_o * preact_sc, a_o, mask=mask)


@triton.jit
def _conv_input_grad_kernel(
    grad_ptr, w_ptr, grad_x_ptr,
    batch, cin, cout: tl.constexpr, height, width,
    grad_sb, grad_sc, grad_sy, grad_sx,
    w_sn, w_sc, w_sy, w_sx,
    grad_x_sb, grad_x_sc, grad_x_sy, grad_x_sx,
    KSIZE_Y: tl.constexpr, KSIZE_X: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (pixel tiles, input-channel tiles): grad_x = conv_transpose(grad_preact, weight).

    grad_x[b, ci, y, x] = sum over taps (ky, kx) and output channels n of
    grad_preact[b, n, y - ky + P, x - kx + P] * weight[n, ci, ky, kx].
    """
    b, y, x, m_ok = _pixel_coordinates(tl.program_id(0), batch, height, width, BLOCK_M)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < cin
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    chunks = tl.cdiv(cout, BLOCK_K)
    # One loop over (tap, channel chunk): Triton software-pipelines innermost loops only.
    for step in range(
        KSIZE_Y * KSIZE_X * ((cout + BLOCK_K - 1) // BLOCK_K)
    ):  # constexpr bound: see _INTERPRETER_CONFIG
        tap = step // chunks
        n0 = (step % chunks) * BLOCK_K
        ky = tap // KSIZE_X
        kx = tap % KSIZE_X
        grad_pixels, inside = _shifted_pixels(
            b, y, x, m_ok, KSIZE_Y // 2 - ky, KSIZE_X // 2 - kx, height, width, grad_sb, grad_sy, grad_sx
        )
        w_tap = w_ptr + ky * w_sy + kx * w_sx + ci.to(tl.int64)[None, :] * w_sc
        n = n0 + tl.arange(0, BLOCK_K)
        n_ok = n < cout
        a = tl.load(grad_ptr + grad_pixels[:, None] + n.to(tl.int64)[None, :] * grad_sc,
                    mask=inside[:, None] & n_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_tap + n.to(tl.int64)[:, None] * w_sn, mask=n_ok[:, None] & ci_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    out = (grad_x_ptr + b[:, None] * grad_x_sb + ci.to(tl.int64)[None, :] * grad_x_sc
           + y.to(tl.int64)[:, None] * grad_x_sy + x.to(tl.int64)[:, None] * grad_x_sx)  # fmt: skip
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_weight_grad_kernel(
    grad_ptr, x_ptr, grad_w_ptr,
    batch: tl.constexpr, cin, cout, height: tl.constexpr, width: tl.constexpr,
    grad_sb, grad_sc, grad_sy, grad_sx,
    x_sb, x_sc, x_sy, x_sx,
    grad_w_sn, grad_w_sc, grad_w_sy, grad_w_sx,
    KSIZE_Y: tl.constexpr, KSIZE_X: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Grid (output-channel tiles, input-channel tiles, taps): one tap's [BLOCK_N, BLOCK_C]
    block of grad_weight, reducing over all B Y X pixels.

    grad_weight[n, ci, ky, kx] = sum over pixels of grad_preact[b, n, y, x] * x[b, ci, y + ky - P, x + kx - P].
    The 25 taps in the grid give enough programs to fill an H100 without split-K.
    """
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(2)
    ky = tap // KSIZE_X
    kx = tap % KSIZE_X
    n_ok = n < cout
    ci_ok = ci < cin
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, batch * height * width, BLOCK_M):  # constexpr bound: see _INTERPRETER_CONFIG
        m = m0 + tl.arange(0, BLOCK_M)  # inline: a device-function call per trip slows the interpreter
        b = (m // (height * width)).to(tl.int64)
        y = (m % (height * width)) // width
        x = m % width
        m_ok = m < batch * height * width
        grad_pixels = b * grad_sb + y.to(tl.int64) * grad_sy + x.to(tl.int64) * grad_sx
        grad_t = tl.load(grad_ptr + grad_pixels[None, :] + n.to(tl.int64)[:, None] * grad_sc,
                         mask=n_ok[:, None] & m_ok[None, :], other=0.0)  # fmt: skip
        x_pixels, inside = _shifted_pixels(
            b, y, x, m_ok, ky - KSIZE_Y // 2, kx - KSIZE_X // 2, height, width, x_sb, x_sy, x_sx
        )
        xt = tl.load(x_ptr + x_pixels[:, None] + ci.to(tl.int64)[None, :] * x_sc,
                     mask=inside[:, None] & ci_ok[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            grad_t, xt = grad_t.to(tl.float32), xt.to(tl.float32)
        acc = tl.dot(grad_t, xt, acc, input_precision=DOT_PRECISION)
    out = (grad_w_ptr + n.to(tl.int64)[:, None] * grad_w_sn + ci.to(tl.int64)[None, :] * grad_w_sc
           + ky * grad_w_sy + kx * grad_w_sx)  # fmt: skip
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=n_ok[:, None] & ci_ok[None, :])


# ---------------------------------------------------------------------------------------
# Launch configurations. On a GPU, autotuned over tiles that suit Hopper (H100 / H200):
# GQN's GEMMs are small (M = B * 256 pixels, 512 gate channels), so small row tiles keep
# B = 8 at one wave of 132 SMs and larger ones serve B = 36. The interpreter runs one small
# config (autotuning needs a GPU to time on). Each host function launches the interpreter's
# kernel or the tuned one by name: triton_op reads `wrap_triton(<kernel>)` calls from the
# source for torch.compile's cache key.
# ---------------------------------------------------------------------------------------

# The interpreter runs programs one after another at a fixed cost per Triton op, so its tiles
# are long in the pixels and the reduction (fewer programs and loop trips) and 16 wide in the
# channels, the smallest tl.dot takes.
# Each kernel's loop bound is written inline from tl.constexpr arguments (the reduction's
# channels; the weight gradient's batch, height and width): Triton 3.6's interpreter turns
# every assigned value and runtime int into a 1-element array, which range() cannot take
# under NumPy >= 2.4. On a GPU this costs one compile per channel count and image size,
# which autotuning keys on anyway (and per batch size for the weight gradient).
_INTERPRETER_CONFIG = {
    "forward": {"BLOCK_M": 128, "BLOCK_H": 16, "BLOCK_K": 32},
    "input_grad": {"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32},
    "weight_grad": {"BLOCK_N": 32, "BLOCK_C": 16, "BLOCK_M": 128},
}


def autotune_budget() -> int | None:
    """GQN_FAST_AUTOTUNE_CONFIGS=N: tune each kernel over its first N configurations only
    (every tile at 3 stages and 4 warps come first), to bound compile time on a first GPU run."""
    value = os.environ.get("GQN_FAST_AUTOTUNE_CONFIGS", "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"GQN_FAST_AUTOTUNE_CONFIGS: expected a positive int, got {value!r}")
    return int(value)


def _autotuned(kernel, block_names, tiles, key):
    """kernel under triton.autotune: every tile with each (stages, warps), keyed on the shapes
    (and any other argument that changes what is fastest) in `key`."""
    configs = [
        triton.Config(dict(zip(block_names, tile)), num_stages=stages, num_warps=warps)
        for stages, warps in ((3, 4), (4, 4), (3, 8))
        for tile in tiles
    ][: autotune_budget()]
    return triton.autotune(configs=configs, key=["batch", "cin", "height", "width", *key])(kernel)


if HAS_TRITON:
    _conv_lstm_cell_forward_tuned = _autotuned(
        _conv_lstm_cell_forward_kernel, ("BLOCK_M", "BLOCK_H", "BLOCK_K"),
        ((32, 32, 32), (64, 16, 32), (64, 32, 32), (64, 32, 64), (128, 32, 32), (128, 16, 64)),
        ("hidden", "GATES_IN_ONE_DOT"),
    )  # fmt: skip
    _conv_input_grad_tuned = _autotuned(
        _conv_input_grad_kernel, ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
        ((32, 64, 32), (64, 64, 32), (64, 64, 64), (128, 64, 32), (64, 128, 32), (128, 128, 32)), ("cout",),
    )  # fmt: skip
    _conv_weight_grad_tuned = _autotuned(
        _conv_weight_grad_kernel, ("BLOCK_N", "BLOCK_C", "BLOCK_M"),
        ((64, 64, 32), (64, 64, 64), (128, 64, 32), (64, 128, 32), (128, 128, 32)), ("cout",),
    )  # fmt: skip


def _dot_settings() -> dict:
    """TF32 for fp32 operands when cuDNN convolutions may use it (PyTorch's default), so the
    fused and unfused paths round alike; the interpreter multiplies in exact fp32."""
    interpreted = interpreter_enabled()
    tf32 = torch.backends.cudnn.allow_tf32 and not interpreted
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "UPCAST": interpreted}


# ---------------------------------------------------------------------------------------
# Host functions: check inputs, pick the path, launch.
# ---------------------------------------------------------------------------------------


def _check_inputs(x, weight, constant, c) -> None:
    for name, tensor in (("x", x), ("weight", weight), ("constant", constant), ("c", c)):
        check_floating(name, tensor)
        if tensor.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims, got shape {list(tensor.shape)}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (as x), got {tensor.device}")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight: expected dtype {x.dtype} (as x: the GEMM's operands share one dtype), got {weight.dtype}"
        )
    out_channels, in_channels, kh, kw = weight.shape
    if out_channels % 4 != 0:
        raise ValueError(f"weight: expected 4*H output channels (gates i, f, g, o), got {out_channels}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"weight: expected odd kernel sizes (same padding), got {kh}x{kw}")
    batch, _, height, width = x.shape
    if x.shape[1] != in_channels:
        raise ValueError(f"x: expected {in_channels} channels (weight's input channels), got shape {list(x.shape)}")
    expected = {"constant": (batch, out_channels, height, width), "c": (batch, out_channels // 4, height, width)}
    for name, tensor in (("constant", constant), ("c", c)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name}: expected shape {list(expected[name])}, got {list(tensor.shape)}")


def _kernel_sizes(weight: torch.Tensor) -> dict:
    return {"KSIZE_Y": weight.shape[-2], "KSIZE_X": weight.shape[-1]}


def _same_padding(weight: torch.Tensor) -> list[int]:
    return [weight.shape[-2] // 2, weight.shape[-1] // 2]


def _output_channels_unit_stride(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, C, K, K] with the output channels adjacent in memory (a copy, unless they are).

    The kernels load [channels x output channels] tiles of it per tap: with PyTorch's layout
    those elements are C*K*K apart, one 32-byte sector each; laid out (K, K, C, N) a tile is
    rows of adjacent values. A copy per call (20 MB for the paper's inference core) costs a
    few percent of the convolution it feeds.
    """
    if weight.stride(0) == 1:
        return weight
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def conv_lstm_cell_forward(x, weight, constant, c, save_preact: bool, gates_in_one_dot: bool = False):
    """(h, c', preact): preact is the fp32 [B, 4H, Y, X] preactivation if save_preact, else empty.
    gates_in_one_dot: the forward's GEMM as one product over all four gates instead of one per
    gate (see the kernel; off until a GPU measures it faster)."""
    _check_inputs(x, weight, constant, c)
    if not use_triton(x, KERNEL_DTYPES):
        return _conv_lstm_cell_forward_torch(x, weight, constant, c, save_preact)
    batch, cin, height, width = x.shape
    hidden = c.shape[1]
    weight = _output_channels_unit_stride(weight)
    h = torch.empty_like(c)
    c_new = torch.empty_like(c)
    preact_shape = (batch, 4 * hidden, height, width) if save_preact else (0, 0, 0, 0)
    preact = torch.empty(preact_shape, dtype=torch.float32, device=x.device)  # unread without SAVE_PREACT
    if c.numel() > 0:
        args = (
            x, weight, constant, c, h, c_new, preact,
            batch, cin, hidden, height, width,
            *x.stride(), *weight.stride(), *constant.stride(), *c.stride(),
            *h.stride(), *c_new.stride(), *preact.stride(),
        )  # fmt: skip
        constexprs = {**_kernel_sizes(weight), "SAVE_PREACT": save_preact, "GATES_IN_ONE_DOT": gates_in_one_dot,
                      **_dot_settings()}  # fmt: skip
        grid = lambda meta: (triton.cdiv(batch * height * width, meta["BLOCK_M"]), triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
        with launch_device(x):
            if interpreter_enabled():
                config = _INTERPRETER_CONFIG["forward"]
                wrap_triton(_conv_lstm_cell_forward_kernel)[grid(config)](*args, **constexprs, **config)
            else:
                wrap_triton(_conv_lstm_cell_forward_tuned)[grid](*args, **constexprs)
    return h, c_new, preact


def conv_lstm_cell_backward(x, weight, preact, c, grad_h, grad_c_new, backward_convs: str):
    """(grad_x, grad_weight, grad_preact, grad_c); grad_preact (fp32) is also the constant's gradient."""
    _check_backward_convs(backward_convs)
    grad_preact, grad_c = lstm_gates_backward(
        preact, c.to(preact.dtype), grad_h.to(preact.dtype), grad_c_new.to(preact.dtype)
    )
    # The convolutions' operands are x's dtype (what autocast gives cuDNN), accumulated in fp32.
    grad_operand = grad_preact.to(x.dtype)
    if backward_convs == "aten" or not use_triton(x, KERNEL_DTYPES):
        grad_x, grad_weight = _conv_backward_aten(grad_operand, x, weight)
    else:
        grad_x, grad_weight = _conv_backward_triton(grad_operand, x, weight)
    return grad_x, grad_weight, grad_preact, grad_c.to(c.dtype)


def _conv_backward_triton(grad, x, weight):
    batch, cin, height, width = x.shape
    cout, ksizes = weight.shape[0], _kernel_sizes(weight)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # Contiguous, as the PyTorch path's: the fake implementation's strides must match.
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=x.device)
    weight = _output_channels_unit_stride(weight)
    dot = _dot_settings()
    if grad_x.numel() > 0:
        grid = lambda meta: (triton.cdiv(batch * height * width, meta["BLOCK_M"]), triton.cdiv(cin, meta["BLOCK_N"]))  # noqa: E731
        args = (
            grad,
            weight,
            grad_x,
            batch,
            cin,
            cout,
            height,
            width,
            *grad.stride(),
            *weight.stride(),
            *grad_x.stride(),
        )
        with launch_device(x):
            if interpreter_enabled():
                config = _INTERPRETER_CONFIG["input_grad"]
                wrap_triton(_conv_input_grad_kernel)[grid(config)](*args, **ksizes, **dot, **config)
            else:
                wrap_triton(_conv_input_grad_tuned)[grid](*args, **ksizes, **dot)
    if grad_weight.numel() > 0:
        if x.numel() == 0:
            grad_weight.zero_()
        else:
            grid = lambda meta: (
                triton.cdiv(cout, meta["BLOCK_N"]),
                triton.cdiv(cin, meta["BLOCK_C"]),
                ksizes["KSIZE_Y"] * ksizes["KSIZE_X"],
            )  # noqa: E731
            args = (
                grad,
                x,
                grad_weight,
                batch,
                cin,
                cout,
                height,
                width,
                *grad.stride(),
                *x.stride(),
                *grad_weight.stride(),
            )
            with launch_device(x):
                if interpreter_enabled():
                    config = _INTERPRETER_CONFIG["weight_grad"]
                    wrap_triton(_conv_weight_grad_kernel)[grid(config)](*args, **ksizes, **dot, **config)
                else:
                    wrap_triton(_conv_weight_grad_tuned)[grid](*args, **ksizes, **dot)
    return grad_x, grad_weight


def _conv_backward_aten(grad, x, weight):
    """cuDNN on a GPU; on the CPU, in the compute dtype (same values: the operands are exact there)."""
    dtype = x.dtype if x.is_cuda else compute_dtype(x.dtype)
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad.to(dtype), x.to(dtype), weight.to(dtype), None,
        [1, 1], _same_padding(weight), [1, 1], False, [0, 0], 1, [True, True, False],
    )  # fmt: skip
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def _conv_lstm_cell_forward_torch(x, weight, constant, c, save_preact):
    """The kernel's math in PyTorch (the CPU path): exact products of the inputs, fp32 sums."""
    dtype = compute_dtype(x.dtype)
    preact = F.conv2d(x.to(dtype), weight.to(dtype), padding=_same_padding(weight)) + constant.to(dtype)
    h, c_new = lstm_gates_torch(preact, c)
    saved = preact if save_preact else preact.new_empty(0, 0, 0, 0)
    return h.to(c.dtype), c_new.to(c.dtype), saved


# ---------------------------------------------------------------------------------------
# The ops (torch.library.triton_op: torch.compile traces through them, see gates.py)
# ---------------------------------------------------------------------------------------


@torch.library.triton_op("gqn_fast::conv_lstm_cell", mutates_args=())
def _conv_lstm_cell_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    constant: torch.Tensor,
    c: torch.Tensor,
    save_preact: bool,
    backward_convs: str,
    gates_in_one_dot: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backward_convs(backward_convs)  # here, not at backward time
    return conv_lstm_cell_forward(x, weight, constant, c, save_preact, gates_in_one_dot)


@torch.library.triton_op("gqn_fast::conv_lstm_cell_backward", mutates_args=())
def _conv_lstm_cell_backward_op(
    x: torch.Tensor, weight: torch.Tensor, preact: torch.Tensor, c: torch.Tensor,
    grad_h: torch.Tensor, grad_c_new: torch.Tensor, backward_convs: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return conv_lstm_cell_backward(x, weight, preact, c, grad_h, grad_c_new, backward_convs)


def _setup_context(ctx, inputs, output):
    x, weight, constant, c, save_preact, backward_convs, _gates_in_one_dot = inputs
    ctx.save_for_backward(x, weight, output[2], c)
    ctx.save_preact, ctx.backward_convs, ctx.constant_dtype = save_preact, backward_convs, constant.dtype


def _autograd_backward(ctx, grad_h, grad_c_new, _grad_preact):
    if not ctx.save_preact:
        raise RuntimeError(
            "conv_lstm_cell: backward needs the preactivations, which were not saved (save_preact=False); "
            "call gqn_fast.kernels.conv_lstm_cell, which saves them when autograd needs them"
        )
    x, weight, preact, c = ctx.saved_tensors
    grad_h = torch.zeros_like(c) if grad_h is None else grad_h
    grad_c_new = torch.zeros_like(c) if grad_c_new is None else grad_c_new
    grad_x, grad_weight, grad_preact, grad_c = _conv_lstm_cell_backward_op(
        x, weight, preact, c, grad_h, grad_c_new, ctx.backward_convs
    )
    return grad_x, grad_weight, grad_preact.to(ctx.constant_dtype), grad_c, None, None, None


_conv_lstm_cell_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def conv_lstm_cell(
    x: torch.Tensor,
    weight: torch.Tensor,
    constant: torch.Tensor,
    c: torch.Tensor,
    *,
    backward_convs: str = "aten",
    gates_in_one_dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ConvLSTM cell from its step-varying input: (h, c').

    x [B, Cin, Y, X] and weight [4H, Cin, Ky, Kx] (same dtype, Ky and Kx odd) give the
    convolution (stride 1, padding (Ky // 2, Kx // 2), no bias); constant [B, 4H, Y, X] is
    added to it (the bias and the share of inputs that do not change between steps; for no
    bias and no other input, a zero tensor expanded to that shape); c [B, H, Y, X] is the
    cell state.
    Gates i, f, g, o in PyTorch's order: c' = sigmoid(f) c + sigmoid(i) tanh(g),
    h = sigmoid(o) tanh(c'); h and c' have c's dtype. Any strides. Differentiable once in
    x, weight, constant and c; backward_convs ("aten" or "triton") picks the kernels of the
    backward's two convolutions; gates_in_one_dot the forward's GEMM as one product over all
    four gates (Hopper's wgmma runs 64 to 256 columns at full rate) instead of four.
    """
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, constant, c))
    h, c_new, _ = _conv_lstm_cell_op(x, weight, constant, c, save, backward_convs, gates_in_one_dot)
    return h, c_new
