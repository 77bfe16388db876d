"""The pixel likelihood, fused: per-sample -log N(x | sigmoid(logits), sigma^2) summed over
every dim but the batch, from the logits (the sigmoid mean image is never stored).

    nll[b] = sum_pixels (x - sigmoid(logits))^2 / (2 sigma^2)  +  N (log sigma + log(2 pi) / 2)

with N the number of pixels per sample. The kernel sums the data term; the constant, the
same for every pixel, is added once on the host in float64 arithmetic.

Layout: kernels, host launch functions, then the torch.library op with its autograd.
"""

from __future__ import annotations

import math

import torch

from .utils import (
    as_batch_channel_space,
    check_floating,
    check_like,
    check_min_dim,
    check_per_sample,
    compute_dtype,
    empty_output_like,
    empty_partial_sums,
    launch_device,
    launch_shape,
    load_tile,
    sigmoid_derivative,
    sigmoid_derivative_torch,
    store_partial_sum,
    store_tile,
    tile_indices,
    tl,
    to_compute,
    triton,
    use_custom_op,
    use_triton,
    wrap_triton,
)

# ---------------------------------------------------------------------------------------
# Triton kernels. Grid: (space tiles, channel tiles, batch). The forward writes one partial
# sum per tile to nll_partial[b, tile], summed on the host: deterministic, no atomics.
# ---------------------------------------------------------------------------------------


@triton.jit
def _pixel_nll_forward_kernel(
    x_ptr, logits_ptr, sigma_ptr, nll_partial_ptr,
    channels, space,
    x_stride_b, x_stride_c, x_stride_s,
    logits_stride_b, logits_stride_c, logits_stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(channels, space, BLOCK_C, BLOCK_S)
    x = load_tile(x_ptr, b, ch, sp, x_stride_b, x_stride_c, x_stride_s, mask)
    logits = load_tile(logits_ptr, b, ch, sp, logits_stride_b, logits_stride_c, logits_stride_s, mask)
    inv_sigma = (1.0 / tl.load(sigma_ptr)).to(x.dtype)  # sigma: an fp64 scalar
    scaled = (x - tl.sigmoid(logits)) * inv_sigma
    data_term = tl.where(mask, 0.5 * scaled * scaled, 0.0)
    store_partial_sum(nll_partial_ptr, data_term, b)


@triton.jit
def _pixel_nll_backward_kernel(
    x_ptr, logits_ptr, sigma_ptr, grad_nll_ptr, grad_x_ptr, grad_logits_ptr,
    channels, space,
    x_stride_b, x_stride_c, x_stride_s,
    logits_stride_b, logits_stride_c, logits_stride_s,
    grad_nll_stride_b,
    grad_stride_b, grad_stride_c, grad_stride_s,  # of both gradients written
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(channels, space, BLOCK_C, BLOCK_S)
    # Recompute the mean from the logits (saved with x and sigma, nothing else).
    x = load_tile(x_ptr, b, ch, sp, x_stride_b, x_stride_c, x_stride_s, mask)
    logits = load_tile(logits_ptr, b, ch, sp, logits_stride_b, logits_stride_c, logits_stride_s, mask)
    grad_nll = to_compute(tl.load(grad_nll_ptr + b * grad_nll_stride_b))
    sigma = tl.load(sigma_ptr)
    inv_var = (1.0 / (sigma * sigma)).to(x.dtype)
    grad_x = grad_nll * (x - tl.sigmoid(logits)) * inv_var
    grad_logits = -grad_x * sigmoid_derivative(logits)
    store_tile(grad_x_ptr, grad_x, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_logits_ptr, grad_logits, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)


# ---------------------------------------------------------------------------------------
# Host functions: check inputs, pick the path and the tile, launch.
# ---------------------------------------------------------------------------------------


def _check_nll_inputs(x, logits, sigma) -> None:
    check_floating("logits", logits)
    check_min_dim("logits", logits, 1, "[B, ...]")
    check_like("x", x, "logits", logits)
    check_floating("sigma", sigma)
    if sigma.dim() != 0 or sigma.device != logits.device:
        raise ValueError(
            f"sigma: expected a 0-dim tensor on {logits.device}, got shape {list(sigma.shape)} on {sigma.device}"
        )


def _check_sigma_value(sigma) -> None:
    """The public API's sigma: a positive finite Python float (an int is taken too)."""
    # A SymFloat (torch.compile, unspecialized float) stands for a float.
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.SymFloat)):
        raise TypeError(f"sigma: expected a positive Python float, got {type(sigma).__name__}")
    if not (0.0 < sigma < math.inf):
        raise ValueError(f"sigma: expected a finite positive float, got {sigma}")


def _log_normalizer_sum(logits: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """N (log sigma + log(2 pi) / 2), in fp64, then the compute dtype: -log N(x | mean, sigma^2)
    at x = mean, summed over the N pixels of a sample."""
    pixels = math.prod(logits.shape[1:])
    normalizer = pixels * (torch.log(sigma.to(torch.float64)) + 0.5 * math.log(2.0 * math.pi))
    return normalizer.to(compute_dtype(logits.dtype))


def pixel_nll_forward(x: torch.Tensor, logits: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    _check_nll_inputs(x, logits, sigma)
    if not use_triton(logits):
        return pixel_nll_torch(x, logits, sigma)
    x3, logits3 = as_batch_channel_space(x), as_batch_channel_space(logits)
    grid, block_c, block_s = launch_shape(logits3)
    nll_partial = empty_partial_sums(logits3, grid)
    if logits.numel() > 0:
        with launch_device(logits):
            wrap_triton(_pixel_nll_forward_kernel)[grid](
                x3, logits3, sigma, nll_partial, logits3.shape[1], logits3.shape[2],
                *x3.stride(), *logits3.stride(),
                BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return nll_partial.sum(dim=1) + _log_normalizer_sum(logits, sigma)


def pixel_nll_backward(x: torch.Tensor, logits: torch.Tensor, sigma: torch.Tensor, grad_nll: torch.Tensor):
    """(grad_x, grad_logits) from grad_nll [B]."""
    _check_nll_inputs(x, logits, sigma)
    check_per_sample("grad_nll", grad_nll, "logits", logits)
    if not use_triton(logits):
        return pixel_nll_backward_torch(x, logits, sigma, grad_nll)
    x3, logits3 = as_batch_channel_space(x), as_batch_channel_space(logits)
    # Both gradients in the logits' layout (one stride set for the kernel).
    grad_x3, grad_x = empty_output_like(logits3, x.shape)
    grad_logits3, grad_logits = empty_output_like(logits3, logits.shape)
    grid, block_c, block_s = launch_shape(logits3)
    if logits.numel() > 0:
        with launch_device(logits):
            wrap_triton(_pixel_nll_backward_kernel)[grid](
                x3, logits3, sigma, grad_nll, grad_x3, grad_logits3, logits3.shape[1], logits3.shape[2],
                *x3.stride(), *logits3.stride(), grad_nll.stride(0), *grad_logits3.stride(),
                BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return grad_x, grad_logits


def pixel_nll_torch(x, logits, sigma):
    """The kernel's math in PyTorch: same fp32 compute, same output dtype."""
    dtype = compute_dtype(logits.dtype)
    inv_sigma = (1.0 / sigma).to(dtype)
    scaled = (x.to(dtype) - torch.sigmoid(logits.to(dtype))) * inv_sigma
    data_term = as_batch_channel_space(0.5 * scaled * scaled).sum(dim=(1, 2))
    return data_term + _log_normalizer_sum(logits, sigma)


def pixel_nll_backward_torch(x, logits, sigma, grad_nll):
    dtype = compute_dtype(logits.dtype)
    logits_c = logits.to(dtype)
    grad_nll = grad_nll.to(dtype).reshape((-1,) + (1,) * (logits.dim() - 1))
    inv_var = (1.0 / (sigma * sigma)).to(dtype)
    grad_x = grad_nll * (x.to(dtype) - torch.sigmoid(logits_c)) * inv_var
    grad_logits = -grad_x * sigmoid_derivative_torch(logits_c)
    return grad_x.to(x.dtype), grad_logits.to(logits.dtype)


# ---------------------------------------------------------------------------------------
# The op: torch.library.triton_op, so torch.compile traces into it without a graph break;
# triton_op registers the function as its own fake (meta) implementation (it only
# allocates and launches through wrap_triton, both FakeTensor-safe). The backward is an op.
# sigma enters the op as a 0-dim fp64 tensor, not a float: a float argument of a custom op
# is burnt into the compiled graph, so an annealed sigma would recompile at every step.
# ---------------------------------------------------------------------------------------


@torch.library.triton_op("gqn_fast::pixel_nll", mutates_args=())
def _pixel_nll_op(x: torch.Tensor, logits: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return pixel_nll_forward(x, logits, sigma)


@torch.library.triton_op("gqn_fast::pixel_nll_backward", mutates_args=())
def _pixel_nll_backward_op(
    x: torch.Tensor, logits: torch.Tensor, sigma: torch.Tensor, grad_nll: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return pixel_nll_backward(x, logits, sigma, grad_nll)


def _pixel_nll_setup_context(ctx, inputs, output):
    # Saves x, the logits and the scalar sigma (the inputs): the backward recomputes
    # sigmoid(logits) rather than keeping the [B, 3, 64, 64] mean image.
    ctx.save_for_backward(*inputs)


def _pixel_nll_autograd_backward(ctx, grad_nll):
    x, logits, sigma = ctx.saved_tensors
    grad_x, grad_logits = _pixel_nll_backward_op(x, logits, sigma, grad_nll)
    return grad_x, grad_logits, None


_pixel_nll_op.register_autograd(_pixel_nll_autograd_backward, setup_context=_pixel_nll_setup_context)


def pixel_nll(
    x: torch.Tensor, logits: torch.Tensor, sigma: float | torch.Tensor, *, custom_op: str = "always"
) -> torch.Tensor:
    """nll [B]: -log N(x | sigmoid(logits), sigma^2) summed over all dims but the first.

    x and logits share shape [B, ...], dtype and device; sigma is the (annealed) pixel
    standard deviation, a positive Python float, or a 0-dim floating tensor on logits' device
    (a CUDA graph's sigma, updated in place between replays: its value is not checked, which
    would make the host wait). nll is fp32 (fp64 for fp64 inputs).
    Differentiable once in logits and x (not in sigma). custom_op: "always" or "auto"
    (kernels/utils.py: use_custom_op).
    """
    if isinstance(sigma, torch.Tensor):  # its shape and device: checked with the other inputs
        check_floating("sigma", sigma)
        sigma_tensor = sigma.to(torch.float64)
    else:
        if not torch.compiler.is_compiling():
            # Not while compiling: a comparison on a traced float fixes its value in the graph.
            _check_sigma_value(sigma)
        device = logits.device if isinstance(logits, torch.Tensor) else None
        # ones * sigma, not torch.full / torch.tensor: torch.compile keeps a float multiplier
        # symbolic, but burns a float it must build a tensor from into the graph (recompiles).
        sigma_tensor = torch.ones((), dtype=torch.float64, device=device) * sigma
    if use_custom_op(logits, custom_op):
        return _pixel_nll_op(x, logits, sigma_tensor)
    _check_nll_inputs(x, logits, sigma_tensor)
    return pixel_nll_torch(x, logits, sigma_tensor)
