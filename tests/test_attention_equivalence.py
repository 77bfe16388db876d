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


@pytest.mark.parametrize("cpu_core_layout", ["channels_last", "contiguous"])
def test_float32_and_both_core_layouts_match_reference(cpu_core_layout):
    config = GQNConfig.preset("attention-small", L=3, hidden=8, canvas=6, r_dim=8, attention_key_dim=4)
    compare(config, batch=2, views=2, seed=3, classes=CLASSES, cpu_core_layout=cpu_core_layout)


def test_one_state_dict_loads_into_both():
    fast, reference = AttentionGQN(), ReferenceAttentionGQN()
    assert list(fast.state_dict()) == list(reference.state_dict())
    fast.load_state_dict(reference.state_dict())
    reference.load_state_dict(fast.state_dict())
    assert fast.config == GQNConfig.preset("attention-small")
