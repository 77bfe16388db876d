"""The posterior sample and its KL to the prior, fused: sigma = softplus(s), the
reparameterised z = mu_q + sigma_q eps, and per-sample KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2))

    KL = log(sigma_p / sigma_q) + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2

summed over every dim but the batch, in one pass over the four parameter maps (and eps),
and computed in a form that stays accurate where posterior and prior nearly agree
(_variance_mismatch). `posterior_kl` is the same op without the sample, and
`elementwise_gaussian_kl_from_sigma` the KL alone, per element, from sigmas (not s).

Layout: kernels, host launch functions, then the torch.library ops with their autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    softplus_derivative,
    softplus_derivative_torch,
    stable_softplus,
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
# KL sum per tile to kl_partial[b, tile], summed on the host: deterministic, no atomics.
# Without the sample (HAS_SAMPLE false) the eps / z pointers are placeholders, never touched.
# Inputs are read with their own strides (a prior can be a bias expanded over the batch, stride
# 0); the gradients a backward kernel writes are made in one layout, one stride set for all.
# ---------------------------------------------------------------------------------------


@triton.jit
def _variance_mismatch(sigma_q, sigma_p):
    """(u, u - log(1 + u)) for u = sigma_q^2 / sigma_p^2 - 1, both free of cancellation.

    KL = (u - log(1 + u)) / 2 + (mu_q - mu_p)^2 / (2 sigma_p^2), and u - log(1 + u) goes to 0
    as q -> p: computed as log(sigma_p / sigma_q) + ... - 1/2 it is a difference of O(1)
    terms, with relative errors of 1e-3 and more where posterior and prior nearly agree.
    u = (sigma_q - sigma_p)(sigma_q + sigma_p) / sigma_p^2 (the difference is exact for sigmas
    within a factor 2). For |u| < 1/2, with v = u / (2 + u) (so log(1 + u) = 2 atanh(v)),
    u - log(1 + u) = u v - 2 v^3 (1/3 + v^2/5 + v^4/7 + ...): no two terms cancel, and 8 terms
    reach fp32 precision (|v| <= 1/3). Elsewhere u - 2 log(sigma_q / sigma_p) is well
    conditioned.
    """
    u = (sigma_q - sigma_p) * (sigma_q + sigma_p) / (sigma_p * sigma_p)
    v = u / (2.0 + u)
    v2 = v * v
    series = 1 / 3 + v2 * (
        1 / 5 + v2 * (1 / 7 + v2 * (1 / 9 + v2 * (1 / 11 + v2 * (1 / 13 + v2 * (1 / 15 + v2 / 17)))))
    )
    near = u * v - 2.0 * v * v2 * series
    far = u - 2.0 * tl.log(sigma_q / sigma_p)
    return u, tl.where(tl.abs(u) < 0.5, near, far)


@triton.jit
def _kl_of_sigmas(diff, sigma_q, sigma_p):
    """Elementwise KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)), diff = mu_q - mu_p."""
    _, mismatch = _variance_mismatch(sigma_q, sigma_p)
    return 0.5 * mismatch + 0.5 * diff * diff / (sigma_p * sigma_p)


@triton.jit
def _kl_gradients_of_sigmas(diff, sigma_q, sigma_p, grad_kl):
    """(dmu_q, dsigma_q, dsigma_p) of grad_kl * KL; dmu_p = -dmu_q.

    dKL/dsigma_q = sigma_q / sigma_p^2 - 1 / sigma_q = u / sigma_q, and
    dKL/dsigma_p = 1 / sigma_p - (sigma_q^2 + diff^2) / sigma_p^3 = -(u + diff^2 / sigma_p^2) / sigma_p:
    the u forms do not cancel as q -> p.
    """
    inv_var_p = 1.0 / (sigma_p * sigma_p)
    u, _ = _variance_mismatch(sigma_q, sigma_p)
    grad_mu_q = grad_kl * diff * inv_var_p
    return grad_mu_q, grad_kl * u / sigma_q, -grad_kl * (u + diff * diff * inv_var_p) / sigma_p


@triton.jit
def _posterior_kl_forward_kernel(
    mu_q_ptr, s_q_ptr, mu_p_ptr, s_p_ptr, eps_ptr, z_ptr, kl_partial_ptr,
    channels, space,
    mu_q_stride_b, mu_q_stride_c, mu_q_stride_s,
    s_q_stride_b, s_q_stride_c, s_q_stride_s,
    mu_p_stride_b, mu_p_stride_c, mu_p_stride_s,
    s_p_stride_b, s_p_stride_c, s_p_stride_s,
    eps_stride_b, eps_stride_c, eps_stride_s,
    z_stride_b, z_stride_c, z_stride_s,
    HAS_SAMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(channels, space, BLOCK_C, BLOCK_S)
    mu_q = load_tile(mu_q_ptr, b, ch, sp, mu_q_stride_b, mu_q_stride_c, mu_q_stride_s, mask)
    s_q = load_tile(s_q_ptr, b, ch, sp, s_q_stride_b, s_q_stride_c, s_q_stride_s, mask)
    mu_p = load_tile(mu_p_ptr, b, ch, sp, mu_p_stride_b, mu_p_stride_c, mu_p_stride_s, mask)
    s_p = load_tile(s_p_ptr, b, ch, sp, s_p_stride_b, s_p_stride_c, s_p_stride_s, mask)

    sigma_q = stable_softplus(s_q)
    sigma_p = stable_softplus(s_p)
    kl = tl.where(mask, _kl_of_sigmas(mu_q - mu_p, sigma_q, sigma_p), 0.0)
    store_partial_sum(kl_partial_ptr, kl, b)

    if HAS_SAMPLE:
        eps = load_tile(eps_ptr, b, ch, sp, eps_stride_b, eps_stride_c, eps_stride_s, mask)
        store_tile(z_ptr, mu_q + sigma_q * eps, b, ch, sp, z_stride_b, z_stride_c, z_stride_s, mask)


@triton.jit
def _posterior_kl_backward_kernel(
    mu_q_ptr, s_q_ptr, mu_p_ptr, s_p_ptr, eps_ptr, grad_z_ptr, grad_kl_ptr,
    grad_mu_q_ptr, grad_s_q_ptr, grad_mu_p_ptr, grad_s_p_ptr, grad_eps_ptr,
    channels, space,
    mu_q_stride_b, mu_q_stride_c, mu_q_stride_s,
    s_q_stride_b, s_q_stride_c, s_q_stride_s,
    mu_p_stride_b, mu_p_stride_c, mu_p_stride_s,
    s_p_stride_b, s_p_stride_c, s_p_stride_s,
    eps_stride_b, eps_stride_c, eps_stride_s,
    grad_z_stride_b, grad_z_stride_c, grad_z_stride_s,
    grad_kl_stride_b,
    grad_stride_b, grad_stride_c, grad_stride_s,  # of every gradient written
    HAS_SAMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(channels, space, BLOCK_C, BLOCK_S)
    # Recompute sigma_q, sigma_p and the difference from the inputs (nothing else saved).
    mu_q = load_tile(mu_q_ptr, b, ch, sp, mu_q_stride_b, mu_q_stride_c, mu_q_stride_s, mask)
    s_q = load_tile(s_q_ptr, b, ch, sp, s_q_stride_b, s_q_stride_c, s_q_stride_s, mask)
    mu_p = load_tile(mu_p_ptr, b, ch, sp, mu_p_stride_b, mu_p_stride_c, mu_p_stride_s, mask)
    s_p = load_tile(s_p_ptr, b, ch, sp, s_p_stride_b, s_p_stride_c, s_p_stride_s, mask)
    grad_kl = to_compute(tl.load(grad_kl_ptr + b * grad_kl_stride_b))

    sigma_q = stable_softplus(s_q)
    sigma_p = stable_softplus(s_p)
    grad_mu_q, grad_sigma_q, grad_sigma_p = _kl_gradients_of_sigmas(mu_q - mu_p, sigma_q, sigma_p, grad_kl)
    grad_mu_p = -grad_mu_q

    if HAS_SAMPLE:
        eps = load_tile(eps_ptr, b, ch, sp, eps_stride_b, eps_stride_c, eps_stride_s, mask)
        grad_z = load_tile(grad_z_ptr, b, ch, sp, grad_z_stride_b, grad_z_stride_c, grad_z_stride_s, mask)
        grad_mu_q += grad_z
        grad_sigma_q += grad_z * eps
        store_tile(grad_eps_ptr, grad_z * sigma_q, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)

    grad_s_q = grad_sigma_q * softplus_derivative(s_q)
    grad_s_p = grad_sigma_p * softplus_derivative(s_p)
    store_tile(grad_mu_q_ptr, grad_mu_q, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_s_q_ptr, grad_s_q, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_mu_p_ptr, grad_mu_p, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_s_p_ptr, grad_s_p, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)


@triton.jit
def _elementwise_kl_forward_kernel(
    mu_q_ptr, sigma_q_ptr, mu_p_ptr, sigma_p_ptr, kl_ptr,
    channels, space,
    mu_q_stride_b, mu_q_stride_c, mu_q_stride_s,
    sigma_q_stride_b, sigma_q_stride_c, sigma_q_stride_s,
    mu_p_stride_b, mu_p_stride_c, mu_p_stride_s,
    sigma_p_stride_b, sigma_p_stride_c, sigma_p_stride_s,
    kl_stride_b, kl_stride_c, kl_stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """elementwise_gaussian_kl_from_sigma: the KL of every element, not summed."""
    b, ch, sp, mask = tile_indices(channels, space, BLOCK_C, BLOCK_S)
    mu_q = load_tile(mu_q_ptr, b, ch, sp, mu_q_stride_b, mu_q_stride_c, mu_q_stride_s, mask)
    sigma_q = load_tile(sigma_q_ptr, b, ch, sp, sigma_q_stride_b, sigma_q_stride_c, sigma_q_stride_s, mask)
    mu_p = load_tile(mu_p_ptr, b, ch, sp, mu_p_stride_b, mu_p_stride_c, mu_p_stride_s, mask)
    sigma_p = load_tile(sigma_p_ptr, b, ch, sp, sigma_p_stride_b, sigma_p_stride_c, sigma_p_stride_s, mask)
    kl = _kl_of_sigmas(mu_q - mu_p, sigma_q, sigma_p)
    store_tile(kl_ptr, kl, b, ch, sp, kl_stride_b, kl_stride_c, kl_stride_s, mask)


@triton.jit
def _elementwise_kl_backward_kernel(
    mu_q_ptr, sigma_q_ptr, mu_p_ptr, sigma_p_ptr, grad_kl_ptr,
    grad_mu_q_ptr, grad_sigma_q_ptr, grad_mu_p_ptr, grad_sigma_p_ptr,
    channels, space,
    mu_q_stride_b, mu_q_stride_c, mu_q_stride_s,
    sigma_q_stride_b, sigma_q_stride_c, sigma_q_stride_s,
    mu_p_stride_b, mu_p_stride_c, mu_p_stride_s,
    sigma_p_stride_b, sigma_p_stride_c, sigma_p_stride_s,
    grad_kl_stride_b, grad_kl_stride_c, grad_kl_stride_s,
    grad_stride_b, grad_stride_c, grad_stride_s,  # of every gradient written
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b, ch, sp, mask = tile_indices(channels, space, BLOCK_C, BLOCK_S)
    mu_q = load_tile(mu_q_ptr, b, ch, sp, mu_q_stride_b, mu_q_stride_c, mu_q_stride_s, mask)
    sigma_q = load_tile(sigma_q_ptr, b, ch, sp, sigma_q_stride_b, sigma_q_stride_c, sigma_q_stride_s, mask)
    mu_p = load_tile(mu_p_ptr, b, ch, sp, mu_p_stride_b, mu_p_stride_c, mu_p_stride_s, mask)
    sigma_p = load_tile(sigma_p_ptr, b, ch, sp, sigma_p_stride_b, sigma_p_stride_c, sigma_p_stride_s, mask)
    grad_kl = load_tile(grad_kl_ptr, b, ch, sp, grad_kl_stride_b, grad_kl_stride_c, grad_kl_stride_s, mask)
    grad_mu_q, grad_sigma_q, grad_sigma_p = _kl_gradients_of_sigmas(mu_q - mu_p, sigma_q, sigma_p, grad_kl)
    store_tile(grad_mu_q_ptr, grad_mu_q, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_sigma_q_ptr, grad_sigma_q, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_mu_p_ptr, -grad_mu_q, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)
    store_tile(grad_sigma_p_ptr, grad_sigma_p, b, ch, sp, grad_stride_b, grad_stride_c, grad_stride_s, mask)


# ---------------------------------------------------------------------------------------
# Host functions: check inputs, pick the path and the tile, launch.
# ---------------------------------------------------------------------------------------


def _check_gaussian_inputs(mu_q, s_q, mu_p, s_p, eps=None) -> None:
    check_floating("mu_q", mu_q)
    check_min_dim("mu_q", mu_q, 1, "[B, ...]")
    for name, tensor in (("s_q", s_q), ("mu_p", mu_p), ("s_p", s_p)) + ((("eps", eps),) if eps is not None else ()):
        check_like(name, tensor, "mu_q", mu_q)


def posterior_kl_forward(mu_q, s_q, mu_p, s_p, eps=None):
    """(z, kl): z of mu_q's dtype (None without eps), kl [B] in the compute dtype."""
    _check_gaussian_inputs(mu_q, s_q, mu_p, s_p, eps)
    if not use_triton(mu_q):
        return posterior_sample_kl_torch(mu_q, s_q, mu_p, s_p, eps)
    views = [as_batch_channel_space(t) for t in (mu_q, s_q, mu_p, s_p)]
    has_sample = eps is not None
    grid, block_c, block_s = launch_shape(views[0])
    kl_partial = empty_partial_sums(views[0], grid)
    if has_sample:
        eps3 = as_batch_channel_space(eps)
        z3, z = empty_output_like(views[0], mu_q.shape)
    else:
        eps3, z3, z = views[0], kl_partial, None  # placeholders, not read or written
    if mu_q.numel() > 0:
        with launch_device(mu_q):
            wrap_triton(_posterior_kl_forward_kernel)[grid](
                *views, eps3, z3, kl_partial, views[0].shape[1], views[0].shape[2],
                *(stride for view in views for stride in view.stride()),
                *(eps3.stride() if has_sample else (0, 0, 0)), *(z3.stride() if has_sample else (0, 0, 0)),
                HAS_SAMPLE=has_sample, BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return z, kl_partial.sum(dim=1)


def posterior_kl_backward(mu_q, s_q, mu_p, s_p, grad_kl, eps=None, grad_z=None):
    """Gradients to (mu_q, s_q, mu_p, s_p[, eps]) from grad_kl [B] (and grad_z, with eps)."""
    _check_gaussian_inputs(mu_q, s_q, mu_p, s_p, eps)
    check_per_sample("grad_kl", grad_kl, "mu_q", mu_q)
    if eps is not None:
        check_like("grad_z", grad_z, "mu_q", mu_q)
    if not use_triton(mu_q):
        return posterior_sample_kl_backward_torch(mu_q, s_q, mu_p, s_p, grad_kl, eps, grad_z)
    views = [as_batch_channel_space(t) for t in (mu_q, s_q, mu_p, s_p)]
    has_sample = eps is not None
    # Every gradient in mu_q's layout (one stride set for the kernel).
    grads = [empty_output_like(views[0], mu_q.shape) for _ in views]
    if has_sample:
        eps3, grad_z3 = as_batch_channel_space(eps), as_batch_channel_space(grad_z)
        grad_eps3, grad_eps = empty_output_like(views[0], eps.shape)
    else:
        eps3, grad_z3, grad_eps3, grad_eps = views[0], views[0], grads[0][0], None  # placeholders
    grid, block_c, block_s = launch_shape(views[0])
    no_strides = (0, 0, 0)
    if mu_q.numel() > 0:
        with launch_device(mu_q):
            wrap_triton(_posterior_kl_backward_kernel)[grid](
                *views, eps3, grad_z3, grad_kl, *(grad3 for grad3, _ in grads), grad_eps3,
                views[0].shape[1], views[0].shape[2],
                *(stride for view in views for stride in view.stride()),
                *(eps3.stride() if has_sample else no_strides), *(grad_z3.stride() if has_sample else no_strides),
                grad_kl.stride(0), *grads[0][0].stride(),
                HAS_SAMPLE=has_sample, BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return [grad for _, grad in grads] + ([grad_eps] if has_sample else [])


def _check_elementwise_inputs(mu_q, sigma_q, mu_p, sigma_p) -> None:
    check_floating("mu_q", mu_q)
    for name, tensor in (("sigma_q", sigma_q), ("mu_p", mu_p), ("sigma_p", sigma_p)):
        check_like(name, tensor, "mu_q", mu_q)


def _as_3d(tensor: torch.Tensor) -> torch.Tensor:
    """as_batch_channel_space, which needs a dim, for a 0-d tensor too."""
    return as_batch_channel_space(tensor.reshape(1) if tensor.dim() == 0 else tensor)


def elementwise_kl_forward(mu_q, sigma_q, mu_p, sigma_p) -> torch.Tensor:
    """kl of mu_q's shape and dtype (computed in fp32, or fp64)."""
    _check_elementwise_inputs(mu_q, sigma_q, mu_p, sigma_p)
    if not use_triton(mu_q):
        return _elementwise_kl_forward_torch(mu_q, sigma_q, mu_p, sigma_p)
    views = [_as_3d(t) for t in (mu_q, sigma_q, mu_p, sigma_p)]
    kl3, kl = empty_output_like(views[0], mu_q.shape)
    grid, block_c, block_s = launch_shape(views[0])
    if mu_q.numel() > 0:
        with launch_device(mu_q):
            wrap_triton(_elementwise_kl_forward_kernel)[grid](
                *views, kl3, views[0].shape[1], views[0].shape[2],
                *(stride for view in views + [kl3] for stride in view.stride()),
                BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return kl


def elementwise_kl_backward(mu_q, sigma_q, mu_p, sigma_p, grad_kl) -> list[torch.Tensor]:
    """Gradients to (mu_q, sigma_q, mu_p, sigma_p) from grad_kl of their shape."""
    _check_elementwise_inputs(mu_q, sigma_q, mu_p, sigma_p)
    check_floating("grad_kl", grad_kl)
    if tuple(grad_kl.shape) != tuple(mu_q.shape) or grad_kl.device != mu_q.device:
        raise ValueError(
            f"grad_kl: expected shape {list(mu_q.shape)} on {mu_q.device}, got {list(grad_kl.shape)} on {grad_kl.device}"
        )
    if not use_triton(mu_q):
        return _elementwise_kl_backward_torch(mu_q, sigma_q, mu_p, sigma_p, grad_kl)
    views = [_as_3d(t) for t in (mu_q, sigma_q, mu_p, sigma_p, grad_kl)]
    grads = [empty_output_like(views[0], mu_q.shape) for _ in range(4)]  # in mu_q's layout, one stride set
    grid, block_c, block_s = launch_shape(views[0])
    if mu_q.numel() > 0:
        with launch_device(mu_q):
            wrap_triton(_elementwise_kl_backward_kernel)[grid](
                *views, *(grad3 for grad3, _ in grads), views[0].shape[1], views[0].shape[2],
                *(stride for view in views for stride in view.stride()), *grads[0][0].stride(),
                BLOCK_C=block_c, BLOCK_S=block_s,
            )  # fmt: skip
    return [grad for _, grad in grads]


def _variance_mismatch_torch(sigma_q, sigma_p):
    """_variance_mismatch in PyTorch."""
    u = (sigma_q - sigma_p) * (sigma_q + sigma_p) / (sigma_p * sigma_p)
    v = u / (2.0 + u)
    v2 = v * v
    series = 1 / 3 + v2 * (
        1 / 5 + v2 * (1 / 7 + v2 * (1 / 9 + v2 * (1 / 11 + v2 * (1 / 13 + v2 * (1 / 15 + v2 / 17)))))
    )
    near = u * v - 2.0 * v * v2 * series
    far = u - 2.0 * torch.log(sigma_q / sigma_p)
    return u, torch.where(u.abs() < 0.5, near, far)


def _kl_of_sigmas_torch(diff, sigma_q, sigma_p):
    """_kl_of_sigmas in PyTorch."""
    return 0.5 * _variance_mismatch_torch(sigma_q, sigma_p)[1] + 0.5 * diff * diff / (sigma_p * sigma_p)


def _kl_gradients_of_sigmas_torch(diff, sigma_q, sigma_p, grad_kl):
    """_kl_gradients_of_sigmas in PyTorch."""
    inv_var_p = 1.0 / (sigma_p * sigma_p)
    u = _variance_mismatch_torch(sigma_q, sigma_p)[0]
    grad_mu_q = grad_kl * diff * inv_var_p
    return grad_mu_q, grad_kl * u / sigma_q, -grad_kl * (u + diff * diff * inv_var_p) / sigma_p


def _per_sample_sum(elementwise: torch.Tensor) -> torch.Tensor:
    return as_batch_channel_space(elementwise).sum(dim=(1, 2))


def posterior_sample_kl_torch(mu_q, s_q, mu_p, s_p, eps):
    """The kernel's math in PyTorch: same fp32 compute, same output dtypes."""
    dtype = compute_dtype(mu_q.dtype)
    mu_q_c, s_q_c, mu_p_c, s_p_c = (t.to(dtype) for t in (mu_q, s_q, mu_p, s_p))
    sigma_q, sigma_p = F.softplus(s_q_c), F.softplus(s_p_c)
    kl = _kl_of_sigmas_torch(mu_q_c - mu_p_c, sigma_q, sigma_p)
    z = None if eps is None else (mu_q_c + sigma_q * eps.to(dtype)).to(mu_q.dtype)
    return z, _per_sample_sum(kl)


def posterior_sample_kl_backward_torch(mu_q, s_q, mu_p, s_p, grad_kl, eps, grad_z):
    dtype = compute_dtype(mu_q.dtype)
    mu_q_c, s_q_c, mu_p_c, s_p_c = (t.to(dtype) for t in (mu_q, s_q, mu_p, s_p))
    # grad_kl [B] broadcast over the sample's other dims.
    grad_kl = grad_kl.to(dtype).reshape((-1,) + (1,) * (mu_q.dim() - 1))
    sigma_q, sigma_p = F.softplus(s_q_c), F.softplus(s_p_c)
    grad_mu_q, grad_sigma_q, grad_sigma_p = _kl_gradients_of_sigmas_torch(mu_q_c - mu_p_c, sigma_q, sigma_p, grad_kl)
    grad_mu_p = -grad_mu_q
    grad_eps = None
    if eps is not None:
        grad_z = grad_z.to(dtype)
        grad_mu_q = grad_mu_q + grad_z
        grad_sigma_q = grad_sigma_q + grad_z * eps.to(dtype)
        grad_eps = (grad_z * sigma_q).to(mu_q.dtype)
    grad_s_q = grad_sigma_q * softplus_derivative_torch(s_q_c)
    grad_s_p = grad_sigma_p * softplus_derivative_torch(s_p_c)
    grads = [g.to(mu_q.dtype) for g in (grad_mu_q, grad_s_q, grad_mu_p, grad_s_p)]
    return grads + ([grad_eps] if eps is not None else [])


def _elementwise_kl_forward_torch(mu_q, sigma_q, mu_p, sigma_p):
    dtype = compute_dtype(mu_q.dtype)
    mu_q_c, sigma_q_c, mu_p_c, sigma_p_c = (t.to(dtype) for t in (mu_q, sigma_q, mu_p, sigma_p))
    return _kl_of_sigmas_torch(mu_q_c - mu_p_c, sigma_q_c, sigma_p_c).to(mu_q.dtype)


def _elementwise_kl_backward_torch(mu_q, sigma_q, mu_p, sigma_p, grad_kl):
    dtype = compute_dtype(mu_q.dtype)
    mu_q_c, sigma_q_c, mu_p_c, sigma_p_c, grad_kl = (t.to(dtype) for t in (mu_q, sigma_q, mu_p, sigma_p, grad_kl))
    grad_mu_q, grad_sigma_q, grad_sigma_p = _kl_gradients_of_sigmas_torch(
        mu_q_c - mu_p_c, sigma_q_c, sigma_p_c, grad_kl
    )
    return [g.to(mu_q.dtype) for g in (grad_mu_q, grad_sigma_q, -grad_mu_q, grad_sigma_p)]


# ---------------------------------------------------------------------------------------
# The ops: torch.library.triton_op, so torch.compile traces into them without a graph break;
# triton_op registers each function as its own fake (meta) implementation (it only
# allocates and launches through wrap_triton, both FakeTensor-safe). Backwards are ops too.
# ---------------------------------------------------------------------------------------


@torch.library.triton_op("gqn_fast::posterior_sample_kl", mutates_args=())
def _posterior_sample_kl_op(
    mu_q: torch.Tensor, s_q: torch.Tensor, mu_p: torch.Tensor, s_p: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return posterior_kl_forward(mu_q, s_q, mu_p, s_p, eps)


@torch.library.triton_op("gqn_fast::posterior_kl", mutates_args=())
def _posterior_kl_op(mu_q: torch.Tensor, s_q: torch.Tensor, mu_p: torch.Tensor, s_p: torch.Tensor) -> torch.Tensor:
    return posterior_kl_forward(mu_q, s_q, mu_p, s_p)[1]


@torch.library.triton_op("gqn_fast::posterior_sample_kl_backward", mutates_args=())
def _posterior_sample_kl_backward_op(
    mu_q: torch.Tensor,
    s_q: torch.Tensor,
    mu_p: torch.Tensor,
    s_p: torch.Tensor,
    eps: torch.Tensor,
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
) -> list[torch.Tensor]:
    return posterior_kl_backward(mu_q, s_q, mu_p, s_p, grad_kl, eps, grad_z)


@torch.library.triton_op("gqn_fast::posterior_kl_backward", mutates_args=())
def _posterior_kl_backward_op(
    mu_q: torch.Tensor, s_q: torch.Tensor, mu_p: torch.Tensor, s_p: torch.Tensor, grad_kl: torch.Tensor
) -> list[torch.Tensor]:
    return posterior_kl_backward(mu_q, s_q, mu_p, s_p, grad_kl)


def _save_inputs(ctx, inputs, output):
    # Saves the inputs only, the least that determines the backward: sigma_q, sigma_p and
    # mu_q - mu_p are recomputed there, cheaper than storing them; z and kl are not needed.
    ctx.save_for_backward(*inputs)


def _posterior_sample_kl_autograd_backward(ctx, grad_z, grad_kl):
    mu_q, s_q, mu_p, s_p, eps = ctx.saved_tensors
    grad_z = torch.zeros_like(mu_q) if grad_z is None else grad_z
    grad_kl = (
        torch.zeros(mu_q.shape[0], dtype=compute_dtype(mu_q.dtype), device=mu_q.device) if grad_kl is None else grad_kl
    )
    return tuple(_posterior_sample_kl_backward_op(mu_q, s_q, mu_p, s_p, eps, grad_z, grad_kl))


def _posterior_kl_autograd_backward(ctx, grad_kl):
    return tuple(_posterior_kl_backward_op(*ctx.saved_tensors, grad_kl))


@torch.library.triton_op("gqn_fast::elementwise_gaussian_kl_from_sigma", mutates_args=())
def _elementwise_kl_op(
    mu_q: torch.Tensor, sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor
) -> torch.Tensor:
    return elementwise_kl_forward(mu_q, sigma_q, mu_p, sigma_p)


@torch.library.triton_op("gqn_fast::elementwise_gaussian_kl_from_sigma_backward", mutates_args=())
def _elementwise_kl_backward_op(
    mu_q: torch.Tensor, sigma_q: torch.Tensor, mu_p: torch.Tensor, sigma_p: torch.Tensor, grad_kl: torch.Tensor
) -> list[torch.Tensor]:
    return elementwise_kl_backward(mu_q, sigma_q, mu_p, sigma_p, grad_kl)


def _elementwise_kl_autograd_backward(ctx, grad_kl):
    return tuple(_elementwise_kl_backward_op(*ctx.saved_tensors, grad_kl))


_elementwise_kl_op.register_autograd(_elementwise_kl_autograd_backward, setup_context=_save_inputs)
_posterior_sample_kl_op.register_autograd(_posterior_sample_kl_autograd_backward, setup_context=_save_inputs)
_posterior_kl_op.register_autograd(_posterior_kl_autograd_backward, setup_context=_save_inputs)


def posterior_sample_kl(
    mu_q: torch.Tensor,
    s_q: torch.Tensor,
    mu_p: torch.Tensor,
    s_p: torch.Tensor,
    eps: torch.Tensor,
    *,
    custom_op: str = "always",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl): the reparameterised posterior sample and its KL to the prior, per sample.

    sigma = softplus(s) (as torch.nn.functional.softplus), z = mu_q + sigma_q eps, and
    kl[b] = sum over all dims but the first of KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)).
    All five inputs share shape [B, ...], dtype and device. z has their dtype and memory
    format; kl [B] is fp32 (fp64 for fp64 inputs), so the loss is summed in fp32 whatever
    the input dtype. Differentiable once in all five inputs, through z and kl. custom_op:
    "always" or "auto" (kernels/utils.py: use_custom_op).
    """
    if use_custom_op(mu_q, custom_op):
        return _posterior_sample_kl_op(mu_q, s_q, mu_p, s_p, eps)
    _check_gaussian_inputs(mu_q, s_q, mu_p, s_p, eps)
    return posterior_sample_kl_torch(mu_q, s_q, mu_p, s_p, eps)


def posterior_kl(
    mu_q: torch.Tensor, s_q: torch.Tensor, mu_p: torch.Tensor, s_p: torch.Tensor, *, custom_op: str = "always"
) -> torch.Tensor:
    """kl [B]: posterior_sample_kl's KL without the sample (fp32; fp64 for fp64 inputs)."""
    if use_custom_op(mu_q, custom_op):
        return _posterior_kl_op(mu_q, s_q, mu_p, s_p)
    _check_gaussian_inputs(mu_q, s_q, mu_p, s_p)
    return posterior_sample_kl_torch(mu_q, s_q, mu_p, s_p, None)[1]


def elementwise_gaussian_kl_from_sigma(
    mu_q: torch.Tensor,
    sigma_q: torch.Tensor,
    mu_p: torch.Tensor,
    sigma_p: torch.Tensor,
    *,
    custom_op: str = "always",
) -> torch.Tensor:
    """kl of mu_q's shape: KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) of every element.

    Takes the standard deviations themselves (posterior_kl takes pre-softplus s) and sums
    nothing (posterior_kl sums per sample). The four inputs share shape, dtype and device
    (gqn_fast.nn.functional.normal_kl broadcasts them); sigmas must be positive. kl has
    their dtype, computed in fp32 (fp64 for fp64), in the form that stays accurate where q
    and p nearly agree. Differentiable once in all four inputs.
    """
    if use_custom_op(mu_q, custom_op):
        return _elementwise_kl_op(mu_q, sigma_q, mu_p, sigma_p)
    _check_elementwise_inputs(mu_q, sigma_q, mu_p, sigma_p)
    return _elementwise_kl_forward_torch(mu_q, sigma_q, mu_p, sigma_p)
