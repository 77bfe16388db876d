"""Fused functions for models that are not gqn_fast's: drop-ins for PyTorch idioms."""

from __future__ import annotations

import numbers

import torch

from gqn_fast.kernels import elementwise_gaussian_kl_from_sigma

_ARGUMENTS = ("q_loc", "q_scale", "p_loc", "p_scale")


def normal_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) of every element.

    The value of `torch.distributions.kl_divergence(Normal(q_loc, q_scale), Normal(p_loc,
    p_scale))`, in one fused kernel on CUDA (with its backward), computed in fp32 in a form
    that stays accurate where q and p nearly agree. Arguments broadcast against each other
    as Normal's do; plain numbers are allowed. Tensors must share one floating dtype and
    device; scales must be positive (not checked: that would wait on the GPU).
    """
    values = dict(zip(_ARGUMENTS, (q_loc, q_scale, p_loc, p_scale)))
    tensors = {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise TypeError(
            "normal_kl: expected at least one torch.Tensor among q_loc, q_scale, p_loc, p_scale, got only numbers"
        )
    first_name, first = next(iter(tensors.items()))
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
            if value.dtype != first.dtype:
                raise TypeError(f"{name}: expected dtype {first.dtype} (as {first_name}), got {value.dtype}")
            if value.device != first.device:
                raise ValueError(f"{name}: expected device {first.device} (as {first_name}), got {value.device}")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[name] = torch.tensor(float(value), dtype=first.dtype, device=first.device)
        else:
            raise TypeError(f"{name}: expected a torch.Tensor or a real number, got {type(value).__name__}")
    try:
        broadcast = torch.broadcast_tensors(*values.values())
    except RuntimeError as error:
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in values.items())
        raise ValueError(f"normal_kl: q_loc, q_scale, p_loc, p_scale do not broadcast together: {shapes}") from error
    return elementwise_gaussian_kl_from_sigma(*broadcast)


__all__ = ["normal_kl"]
