"""Comparisons shared by the tests: a scale-free error with per-dtype limits."""

import torch

# Relative RMS error limits, rms(ref - out) / rms(ref), per compute dtype.
RMS_LIMITS = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64; NaN anywhere makes it NaN (which fails every limit)."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {list(out.shape)} != reference {list(ref.shape)}")
    diff = (out - ref).pow(2).mean().sqrt()
    scale = ref.pow(2).mean().sqrt()
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("nan")
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def assert_close_rms(out, ref, limit, name="output"):
    err = rel_rms(out, ref)
    # `not err <= limit` so that NaN fails too.
    assert err <= limit, f"{name}: relative RMS error {err:.3g} exceeds {limit:.1g}"
