"""gqn_fast.jump.JUMP against the reference Consistent GQN: same weights, same noise, the same
numbers and every gradient, on drawn configurations, target sets and paths.

The reference runs in float64 as the oracle. The fast model runs in float64 too (the algebra's
own error, limit RMS_LIMITS' 1e-10), or in fp32 (limit: fp32's, or 4x the plain reference's own
fp32 error): helpers.compare_with_reference."""

import pytest
import torch
from gqn_fast.reference import transform_viewpoint
from gqn_fast.reference.jump import JUMP as ReferenceJUMP
from helpers import (
    assert_state_dicts_load_both_ways,
    compare_with_reference,
    is_canvas,
    shapes_saved_for_backward,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gqn_fast import GQNConfig, kernels
from gqn_fast.jump import JUMP


@st.composite
def configs(draw, max_L=3):
    return GQNConfig(
        model="jump",
        representation=draw(st.sampled_from(["tower", "pool", "pyramid"])),
        L=draw(st.integers(1, max_L)),
        z_dim=draw(st.integers(1, 3)),
        hidden=draw(st.integers(2, 8)),
        canvas=draw(st.integers(2, 8)),
        r_dim=draw(st.sampled_from([8, 16])),
        share_cores=draw(st.booleans()),
    )


def scene(batch, views, targets, generator):
    """context_x, context_v, query_x, query_v in float64; targets None: one query per scene
    ([B, 3, 64, 64], [B, 7]), else a set of that many ([B, K, 3, 64, 64], [B, K, 7])."""
    shape = (batch,) if targets is None else (batch, targets)
    g, f64 = generator, torch.float64
    return [
        torch.rand(batch, views, 3, 64, 64, generator=g, dtype=f64),
        transform_viewpoint(torch.randn(batch, views, 5, generator=g, dtype=f64)),
        torch.rand(*shape, 3, 64, 64, generator=g, dtype=f64),
        transform_viewpoint(torch.randn(*shape, 5, generator=g, dtype=f64)),
    ]


def compare(config, batch, views, targets, seed, dtype=torch.float64, device="cpu", **choices):
    make_data = lambda: scene(batch, views, targets, torch.Generator().manual_seed(seed))
    compare_with_reference(ReferenceJUMP, JUMP, config, make_data, seed, dtype, 0.7, device, **choices)


@given(
    config=configs(),
    batch=st.integers(1, 2),
    views=st.integers(1, 2),
    targets=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 2**16),
    custom_ops=st.sampled_from(["auto", "always"]),
    layout=st.sampled_from(["channels_last", "contiguous"]),
)
@settings(max_examples=8, deadline=None)
def test_cpu_path_matches_reference_in_float64(config, batch, views, targets, seed, custom_ops, layout):
    """Every output and gradient within 1e-10 of the oracle: the ops' PyTorch forms through autograd
    (auto, the CPU's default) or the custom ops with their own backward (always), the cores'
    activations in either layout."""
    compare(config, batch, views, targets, seed, custom_ops=custom_ops, cpu_core_layout=layout)


def test_small_preset_matches_reference_in_fp32():
    compare(GQNConfig.preset("jump-small", L=2), batch=1, views=1, targets=2, seed=0, dtype=torch.float32)


def test_state_dict_loads_both_ways():
    config = GQNConfig.preset("jump-small")
    assert_state_dicts_load_both_ways(ReferenceJUMP(config), JUMP(config))


def test_no_canvas_is_saved_for_backward():
    """The reference keeps its renderer's [B K, canvas, 64, 64] canvases for backward; fast none."""
    config = GQNConfig(model="jump", L=2, z_dim=2, hidden=4, canvas=5, r_dim=8)
    inputs = [t.float() for t in scene(1, 1, 2, None)]
    saved = {
        name: shapes_saved_for_backward(cls(config), inputs)
        for name, cls in [("fast", JUMP), ("reference", ReferenceJUMP)]
    }
    assert any(is_canvas(s, config.canvas) for s in saved["reference"])
    assert not any(is_canvas(s, config.canvas) for s in saved["fast"])


def test_bad_choice_is_named():
    with pytest.raises(ValueError, match=r"custom_ops: expected one of \('auto', 'always'\), got 'sometimes'"):
        JUMP(GQNConfig.preset("jump-small"), custom_ops="sometimes")


@pytest.mark.interpreter
@given(config=configs(max_L=2), seed=st.integers(0, 2**16))
@settings(max_examples=1, deadline=None)
def test_triton_path_matches_reference_under_interpreter(config, seed):
    """The Triton kernels (gates, posterior sample and KL, pixel NLL) in Triton's CPU interpreter."""
    assert kernels.use_triton(torch.zeros(1)), "the kernels did not take the Triton path"
    compare(config, batch=1, views=1, targets=2, seed=seed)


@pytest.mark.cuda
def test_jump_cuda_matches_reference(monkeypatch):
    """On a GPU in strict fp32 (TF32 off), the jump-small preset with a target set of 3."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare(GQNConfig.preset("jump-small"), batch=4, views=2, targets=3, seed=0, dtype=torch.float32, device="cuda")
