"""The ConvLSTM cell's gate math, fused: one read of the preactivations and the cell state,
one write of h and c' (and the same for the backward).

    i, f, g, o = (preact + constant).chunk(4, dim=1)   # PyTorch's gate order; constant optional
    c' = sigmoid(f) c + sigmoid(i) tanh(g)
    h  = sigmoid(o) tanh(c')

The optional constant is read in the same pass: a conv's output plus what does not change
between steps (gqn_fast.GQN hoists it) costs no separate add, which would read both and write
their sum once more.

Layout: kernels, host launch functions, then the torch.library op with its autograd.
"""

from __future__ import annotations

import torch

from .utils import (
    accurate_tanh,
    as_batch_channel_space,
    check_floating,
    check_like,
    check_min_dim,
    compute_dtype,
    empty_output_like,
    launch_device,
    launch_shape,
    load_tile,
    sigmoid_derivative,
    sigmoid_derivative_torch,
    store_tile,
    tanh_derivative,
    tanh_derivative_torch,
    tile_indices,
    tl,
    triton,
    use_custom_op,
    use_triton,
    wrap_triton,
)

# ---------------------------------------------------------------------------------------
# Triton kernels. Grid: (space tiles, hidden-channel tiles, batch); each program handles a
# [BLOCK_C, BLOCK_S] tile of hidden channels and reads the four gates' matching tiles.
# ---------------------------------------------------------------------------------------


@triton.jit
def _preactivations(
    preact_ptr, const_ptr, b, ch, sp, hidden, mask,
    preact_stride_b, preact_stride_c, preact_stride_s, const_stride_b, const_stride_c, const_stride_s,
    HAS_CONSTANT: tl.constexpr,
):  # fmt: skip
    """The four gates' [BLOCK_C, BLOCK_S] tiles of preact (+ constant), in the compute dtype."""
    preact_strides = (preact_stride_b, preact_stride_c, preact_stride_s)
    a_i = load_tile(preact_ptr, b, ch, sp, *preact_strides, mask)
    a_f = load_tile(preact_ptr, b, ch + hidden, sp, *preact_strides, mask)
    a_g = load_tile(preact_ptr, b, ch + 2 * hidden, sp, *preact_strides, mask)
    a_o = load_tile(preact_ptr, b, ch + 3 * hidden, sp, *preact_strides, mask)
    if HAS_CONSTANT:
        const_strides = (const_stride_b, const_stride_c, const_stride_s)
        a_i += load_tile(const_ptr, b, ch, sp, *const_strides, mask)
        a_f += load_tile(const_ptr, b, ch + hidden, sp, *const_strides, mask)
        a_g += load_tile(const_ptr, b, ch + 2 * hidden, sp, *const_strides, mask)
        a_o += load_tile(const_ptr, b, ch + 3 * hidden, sp, *const_strides, mask)
    return a_i, a_f, a_g, a_o


@triton.jit
def _lstm_gates_forward_kernel(
    preact_ptr, const_ptr, c_ptr, h_ptr, c_new_ptr,
    hidden, space,
    preact_stride_b, preact_stride_c, preact_stride_s,
    const_stride_b, const_stride_c, const_stride_s,
    c_stride_b, c_stride_c, c_stride_s,
    h_stride_b, h_stride_c, h_stride_s,
    c_new_stride_b, c_new_stride_c, c_new_stride_s,
    HAS_CONSTANT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(hidden, space, BLOCK_C, BLOCK_S)
    a_i, a_f, a_g, a_o = _preactivations(
        preact_ptr, const_ptr, b, ch, sp, hidden, mask,
        preact_stride_b, preact_stride_c, preact_stride_s, const_stride_b, const_stride_c, const_stride_s,
        HAS_CONSTANT,
    )  # fmt: skip
    c = load_tile(c_ptr, b, ch, sp, c_stride_b, c_stride_c, c_stride_s, mask)

    c_new = tl.sigmoid(a_f) * c + tl.sigmoid(a_i) * accurate_tanh(a_g)
    h = tl.sigmoid(a_o) * accurate_tanh(c_new)

    store_tile(h_ptr, h, b, ch, sp, h_stride_b, h_stride_c, h_stride_s, mask)
    store_tile(c_new_ptr, c_new, b, ch, sp, c_new_stride_b, c_new_stride_c, c_new_stride_s, mask)


@triton.jit
def _lstm_gates_backward_kernel(
    preact_ptr, const_ptr, c_ptr, grad_h_ptr, grad_c_new_ptr, grad_preact_ptr, grad_c_ptr,
    hidden, space,
    preact_stride_b, preact_stride_c, preact_stride_s,
    const_stride_b, const_stride_c, const_stride_s,
    c_stride_b, c_stride_c, c_stride_s,
    grad_h_stride_b, grad_h_stride_c, grad_h_stride_s,
    grad_c_new_stride_b, grad_c_new_stride_c, grad_c_new_stride_s,
    grad_preact_stride_b, grad_preact_stride_c, grad_preact_stride_s,
    grad_c_stride_b, grad_c_stride_c, grad_c_stride_s,
    HAS_CONSTANT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(hidden, space, BLOCK_C, BLOCK_S)
    # Recompute the forward from preact (+ constant) and c: cheaper than saving 4 activations and c'.
    a_i, a_f, a_g, a_o = _preactivations(
        preact_ptr, const_ptr, b, ch, sp, hidden, mask,
        preact_stride_b, preact_stride_c, preact_stride_s, const_stride_b, const_stride_c, const_stride_s,
        HAS_CONSTANT,
    )  # fmt: skip
    c = load_tile(c_ptr, b, ch, sp, c_stride_b, c_stride_c, c_stride_s, mask)
    i = tl.sigmoid(a_i)
    f = tl.sigmoid(a_f)
    g = accurate_tanh(a_g)
    c_new = f * c + i * g

    grad_h = load_tile(grad_h_ptr, b, ch, sp, grad_h_stride_b, grad_h_stride_c, grad_h_stride_s, mask)
    grad_c_new = load_tile(
        grad_c_new_ptr, b, ch, sp, grad_c_new_stride_b, grad_c_new_stride_c, grad_c_new_stride_s, mask
    )

    # Derivatives in the tail-accurate forms: sigmoid(x) sigmoid(-x), 4e/(1+e)^2.
    grad_c_total = grad_c_new + grad_h * tl.sigmoid(a_o) * tanh_derivative(c_new)
    grad_a_i = grad_c_total * g * sigmoid_derivative(a_i)
    grad_a_f = grad_c_total * c * sigmoid_derivative(a_f)
    grad_a_g = grad_c_total * i * tanh_derivative(a_g)
    grad_a_o = grad_h * accurate_tanh(c_new) * sigmoid_derivative(a_o)

    grad_preact_strides = (grad_preact_stride_b, grad_preact_stride_c, grad_preact_stride_s)
    store_tile(grad_preact_ptr, grad_a_i, b, ch, sp, *grad_preact_strides, mask)
    store_tile(grad_preact_ptr, grad_a_f, b, ch + hidden, sp, *grad_preact_strides, mask)
    store_tile(grad_preact_ptr, grad_a_g, b, ch + 2 * hidden, sp, *grad_preact_strides, mask)
    store_tile(grad_preact_ptr, grad_a_o, b, ch + 3 * hidden, sp, *grad_preact_strides, mask)
    store_tile(grad_c_ptr, grad_c_total * f, b, ch, sp, grad_c_stride_b, grad_c_stride_c, grad_c_stride_s, mask)


# ---------------------------------------------------------------------------------------
# Host functions: check inputs, pick the path and the tile, launch.
# ---------------------------------------------------------------------------------------


def _check_gates_inputs(preact, c, constant=None) -> None:
    check_floating("preact", preact)
    check_min_dim("preact", preact, 2, "[B, 4H, *spatial]")
    if preact.shape[1] % 4 != 0:
        raise ValueError(
            f"preact: expected 4*H channels on dim 1 (gates i, f, g, o), got {preact.shape[1]}, not divisible by 4"
        )
    c_shape = (preact.shape[0], preact.shape[1] // 4, *preact.shape[2:])
    # preact and the constant may be narrower than the cell state (a bf16 conv's output beside
    # an fp32 c under autocast): read as they are, computed in fp32.
    check_like("c", c, "preact", preact, shape=c_shape, same_dtype=False)
    if constant is not None:
        check_like("constant", constant, "preact", preact, same_dtype=False)


def lstm_gates_forward(
    preact: torch.Tensor, c: torch.Tensor, constant: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_gates_inputs(preact, c, constant)
    if not use_triton(preact):
        return lstm_gates_torch(preact, c, constant)
    preact3, c3 = as_batch_channel_space(preact), as_batch_channel_space(c)
    const3 = preact3 if constant is None else as_batch_channel_space(constant)  # unread without one
    h3, h = empty_output_like(c3, c.shape)
    c_new3, c_new = empty_output_like(c3, c.shape)
    grid, block_c, block_s = launch_shape(c3)
    hidden, space = c3.shape[1], c3.shape[2]
    if c.numel() > 0:
        with launch_device(c):
            wrap_triton(_lstm_gates_forward_kernel)[grid](
                preact3, const3, c3, h3, c_new3, hidden, space,
                *preact3.stride(), *const3.stride(), *c3.stride(), *h3.stride(), *c_new3.stride(),
                HAS_CONSTANT=constant is not None, BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return h, c_new


def lstm_gates_backward(
    preact: torch.Tensor,
    c: torch.Tensor,
    grad_h: torch.Tensor,
    grad_c_new: torch.Tensor,
    constant: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_preact, grad_c); grad_preact is also the constant's gradient."""
    _check_gates_inputs(preact, c, constant)
    check_like("grad_h", grad_h, "c", c)
    check_like("grad_c_new", grad_c_new, "c", c)
    if not use_triton(preact):
        return lstm_gates_backward_torch(preact, c, grad_h, grad_c_new, constant)
    preact3, c3 = as_batch_channel_space(preact), as_batch_channel_space(c)
    const3 = preact3 if constant is None else as_batch_channel_space(constant)
    grad_h3, grad_c_new3 = as_batch_channel_space(grad_h), as_batch_channel_space(grad_c_new)
    grad_preact3, grad_preact = empty_output_like(preact3, preact.shape)
    grad_c3, grad_c = empty_output_like(c3, c.shape)
    grid, block_c, block_s = launch_shape(c3)
    hidden, space = c3.shape[1], c3.shape[2]
    if c.numel() > 0:
        with launch_device(c):
            wrap_triton(_lstm_gates_backward_kernel)[grid](
                preact3, const3, c3, grad_h3, grad_c_new3, grad_preact3, grad_c3, hidden, space,
                *preact3.stride(), *const3.stride(), *c3.stride(), *grad_h3.stride(), *grad_c_new3.stride(),
                *grad_preact3.stride(), *grad_c3.stride(),
                HAS_CONSTANT=constant is not None, BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return grad_preact, grad_c


def _preact_torch(preact, constant, dtype):
    preact = preact.to(dtype)
    return preact if constant is None else preact + constant.to(dtype)


def lstm_gates_torch(preact, c, constant=None):
    """The kernel's math in PyTorch: same fp32 compute; h and c' in c's dtype."""
    dtype = compute_dtype(c.dtype)
    a_i, a_f, a_g, a_o = _preact_torch(preact, constant, dtype).chunk(4, dim=1)
    c_new = torch.sigmoid(a_f) * c.to(dtype) + torch.sigmoid(a_i) * torch.tanh(a_g)
    h = torch.sigmoid(a_o) * torch.tanh(c_new)
    return h.to(c.dtype), c_new.to(c.dtype)


def lstm_gates_backward_torch(preact, c, grad_h, grad_c_new, constant=None):
    dtype = compute_dtype(c.dtype)
    a_i, a_f, a_g, a_o = _preact_torch(preact, constant, dtype).chunk(4, dim=1)
    c, grad_h, grad_c_new = c.to(dtype), grad_h.to(dtype), grad_c_new.to(dtype)
    i, f, g = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g)
    c_new = f * c + i * g
    grad_c_total = grad_c_new + grad_h * torch.sigmoid(a_o) * tanh_derivative_torch(c_new)
    grad_preact = torch.cat(
        [
            grad_c_total * g * sigmoid_derivative_torch(a_i),
            grad_c_total * c * sigmoid_derivative_torch(a_f),
            grad_c_total * i * tanh_derivative_torch(a_g),
            grad_h * torch.tanh(c_new) * sigmoid_derivative_torch(a_o),
        ],
        dim=1,
    )
    return grad_preact.to(preact.dtype), (grad_c_total * f).to(c.dtype)


# ---------------------------------------------------------------------------------------
# The op: torch.library.triton_op, so torch.compile traces into it (the kernels, or on the
# CPU the PyTorch path) without a graph break. triton_op registers its function as the
# fake (meta) implementation itself: the function only allocates outputs and launches
# through wrap_triton, which both run on FakeTensors. The backward is an op of its own.
# ---------------------------------------------------------------------------------------


@torch.library.triton_op("gqn_fast::lstm_gates", mutates_args=())
def _lstm_gates_op(
    preact: torch.Tensor, c: torch.Tensor, constant: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return lstm_gates_forward(preact, c, constant)


@torch.library.triton_op("gqn_fast::lstm_gates_backward", mutates_args=())
def _lstm_gates_backward_op(
    preact: torch.Tensor,
    c: torch.Tensor,
    grad_h: torch.Tensor,
    grad_c_new: torch.Tensor,
    constant: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return lstm_gates_backward(preact, c, grad_h, grad_c_new, constant)


def _lstm_gates_setup_context(ctx, inputs, output):
    # Saves the inputs, the least that determines the backward: the kernel recomputes the
    # four gate activations and c' from them rather than storing them (5 more tensors).
    preact, c, constant = inputs
    ctx.save_for_backward(preact, c, constant)


def _lstm_gates_autograd_backward(ctx, grad_h, grad_c_new):
    preact, c, constant = ctx.saved_tensors
    grad_h = torch.zeros_like(c) if grad_h is None else grad_h
    grad_c_new = torch.zeros_like(c) if grad_c_new is None else grad_c_new
    grad_preact, grad_c = _lstm_gates_backward_op(preact, c, grad_h, grad_c_new, constant)
    # d(preact + constant)/d constant = 1: the constant's gradient is preact's.
    return grad_preact, grad_c, None if constant is None else grad_preact.to(constant.dtype)


_lstm_gates_op.register_autograd(_lstm_gates_autograd_backward, setup_context=_lstm_gates_setup_context)


def lstm_gates(
    preact: torch.Tensor, c: torch.Tensor, constant: torch.Tensor | None = None, *, custom_op: str = "always"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvLSTM gate math: (h, c') from preact [B, 4H, *spatial] (gates i, f, g, o on dim 1)
    and the cell state c [B, H, *spatial]; with a constant (preact's shape and device), from
    preact + constant, read in the same pass.

    c' = sigmoid(f) c + sigmoid(i) tanh(g), h = sigmoid(o) tanh(c'). Computes in fp32 (fp64
    for fp64 inputs); h and c' have c's dtype and memory format. preact and the constant may be
    of a narrower float dtype than c (a bf16 conv's output beside an fp32 cell state: no cast
    first); float64 goes only with float64. Any strides. Differentiable once in preact, c and
    constant, each gradient in its input's dtype (the constant's is preact's, so of preact's
    precision); the backward is not itself differentiable, except on custom_op="auto"'s PyTorch
    path (kernels/utils.py: use_custom_op).
    """
    if use_custom_op(preact, custom_op):
        return _lstm_gates_op(preact, c, constant)
    _check_gates_inputs(preact, c, constant)
    return lstm_gates_torch(preact, c, constant)
