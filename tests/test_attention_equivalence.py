"""gqn_fast.AttentionGQN against the reference attention GQN in float64: same weights, same noise,
every output and every gradient (test_fast_equivalence's `compare`)."""

import pytest
import torch
from gqn_fast.reference.attention import AttentionGQN as ReferenceAttentionGQN
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast_equivalence import compare

from gqn_fast import GQNConfig
from gqn_fast.attention import AttentionGQN

CLASSES = (ReferenceAttentionGQN, AttentionGQN)


@st.composite
def attention_configs(draw):
    return GQNConfig(
        model="attention",
        L=draw(st.integers(1, 4)),  # L = 4: the canvas shares of three later steps pending at once
        z_dim=draw(st.integers(1, 3)),
        hidden=draw(st.integers(2, 8)),
        canvas=draw(st.integers(2, 6)),
        r_dim=draw(st.sampled_from([2, 4, 8])),
        share_cores=draw(st.booleans()),
        attention_patch=draw(st.sampled_from([8, 16, 32, 64])),
        attention_key_dim=draw(st.integers(1, 6)),
    )


@settings(max_examples=10)
@given(config=attention_configs(), batch=st.integers(1, 3), views=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_float64_matches_reference(config, batch, views, seed):
    """Outputs, every gradient and generate's image, relative RMS below 1e-10 (float64)."""
    compare(config, batch, views, seed, dtype=torch.float64, classes=CLASSES)


@pytest.mark.parametrize(
    "choices",
    [dict(cpu_core_layout="channels_last"), dict(cpu_core_layout="contiguous"), dict(custom_ops="always")],
    ids=["channels-last-cores", "nchw-cores", "custom-ops"],
)
def test_float32_core_layouts_and_custom_ops_match_reference(choices):
    """Both CPU core layouts, and the project's gate and posterior ops (their PyTorch path here),
    as the GPU runs them."""
    config = GQNConfig.preset("attention-small", L=3, hidden=8, canvas=6, r_dim=8, attention_key_dim=4)
    compare(config, batch=2, views=2, seed=3, classes=CLASSES, **choices)


def test_the_gpu_op_structure_counts_on_meta_tensors():
    """bench/op_count.py counts the GPU's ops of a fast model on the meta device (gpu_check's
    train_step rows): it runs attention GQN, and with fewer ops than the reference."""
    from op_count import count_training_step, on_gpu_branches

    config = GQNConfig.preset("attention-small", L=3)
    fast = count_training_step(on_gpu_branches(AttentionGQN, config), batch=2)
    reference = count_training_step(on_gpu_branches(ReferenceAttentionGQN, config), batch=2)
    assert fast["custom ops"] > 0 and fast["ops"] < reference["ops"]


def test_one_state_dict_loads_into_both():
    fast, reference = AttentionGQN(), ReferenceAttentionGQN()
    assert list(fast.state_dict()) == list(reference.state_dict())
    fast.load_state_dict(reference.state_dict())
    reference.load_state_dict(fast.state_dict())
    assert fast.config == GQNConfig.preset("attention-small")


@pytest.mark.cuda
@pytest.mark.parametrize("fused_cells", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("share_cores", [False, True], ids=["unshared", "shared"])
def test_cuda_matches_reference(share_cores, fused_cells, monkeypatch):
    """On a GPU, in strict fp32 (TF32 off for cuDNN and matmuls alike): the Triton kernels and
    the fused attention."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = GQNConfig.preset("attention-small", share_cores=share_cores, L=3)
    compare(config, batch=4, views=3, seed=0, device="cuda", classes=CLASSES, fused_cells=fused_cells)
