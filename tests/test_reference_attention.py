"""The reference attention GQN: its attention and patches against independent oracles from torch,
its shapes, its invariance to the order of the context views, and its errors."""

import pytest
import torch
import torch.nn.functional as F
from gqn_fast.reference.attention import AttentionGQN, attend, cut_patches, patch_centres
from helpers import assert_close_rms, random_scene_batch
from hypothesis import given, settings
from hypothesis import strategies as st

from gqn_fast import GQNConfig
from gqn_fast.schedules import nll_floor


def tiny_attention_config(**overrides):
    values = dict(model="attention", L=2, z_dim=2, hidden=8, canvas=8, r_dim=8, attention_patch=16)
    values.update(overrides)
    return GQNConfig(**values)


@given(
    batch=st.integers(1, 3),
    queries=st.integers(1, 9),
    keys=st.integers(1, 9),
    dim=st.integers(1, 8),
    value_dim=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_attend_equals_scaled_dot_product_attention(batch, queries, keys, dim, value_dim, seed):
    torch.manual_seed(seed)
    q = torch.randn(batch, queries, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, keys, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, keys, value_dim, dtype=torch.float64, requires_grad=True)
    out, want = attend(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert_close_rms(out, want, 1e-12, "attention")
    grad = torch.randn_like(want)
    for name, got, expected in zip(
        "qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)
    ):
        assert_close_rms(got, expected, 1e-12, f"grad {name}")


@pytest.mark.parametrize("patch", [4, 8, 16, 32, 64])
def test_cut_patches_equals_unfold(patch):
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grid = 64 // patch
    # unfold: [N, 3 P P, G G], the patches' pixels in (channel, row, column) order, row-major patches
    want = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2).reshape(2, grid * grid, 3, patch, patch)
    assert torch.equal(cut_patches(x, patch), want)


def test_patch_centres():
    want = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]], dtype=torch.float64)
    assert torch.equal(patch_centres(2, torch.float64, torch.device("cpu")), want)


@pytest.mark.parametrize("share_cores", [False, True])
def test_shapes_ranges_and_gradients(share_cores):
    config = tiny_attention_config(share_cores=share_cores, L=3)
    model = AttentionGQN(config)
    B, M = 2, 3
    context_x, context_v, query_x, query_v = random_scene_batch(B, M)

    scene = model.represent(context_x, context_v)
    patches = M * (64 // config.attention_patch) ** 2
    assert scene.keys.shape == (B, patches, config.attention_key_dim)
    assert scene.values.shape == (B, patches, config.r_dim)

    out = model.elbo(context_x, context_v, query_x, query_v, sigma=0.7)
    assert out.nll.shape == (B,) and out.kl.shape == (B, config.L) and out.mean.shape == (B, 3, 64, 64)
    assert ((out.mean > 0) & (out.mean < 1)).all()
    assert (out.kl >= 0).all()
    assert (out.nll >= nll_floor(0.7)).all()
    torch.testing.assert_close(out.loss, (out.nll + out.kl.sum(1)).mean())
    out.loss.backward()
    for name, p in model.named_parameters():  # the attention's parameters all take part
        if name.split(".")[0] in ("patch_net", "key", "value", "query"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    image = model.generate(context_x, context_v, query_v)
    assert image.shape == (B, 3, 64, 64) and ((image > 0) & (image < 1)).all()


def test_one_patch_is_read_everywhere():
    """With one context view of one 64x64 patch, every position reads that patch's value."""
    model = AttentionGQN(tiny_attention_config(attention_patch=64)).double()
    context_x, context_v, _, _ = random_scene_batch(2, 1, dtype=torch.float64)
    scene = model.represent(context_x, context_v)
    read = model.read(scene, torch.randn(2, 8, 16, 16, dtype=torch.float64))
    assert_close_rms(read, scene.values[:, 0, :, None, None].expand_as(read), 1e-14, "read")


@settings(max_examples=5)
@given(views=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_the_order_of_context_views_does_not_matter(views, seed):
    """The patches are a set: shuffling the context views changes nothing but rounding."""
    torch.manual_seed(seed)
    model = AttentionGQN(tiny_attention_config()).double()
    context_x, context_v, query_x, query_v = random_scene_batch(2, views, dtype=torch.float64)
    noise = torch.randn(2, 2, 2, 16, 16, dtype=torch.float64)
    order = torch.randperm(views)
    a = model.elbo(context_x, context_v, query_x, query_v, sigma=0.7, noise=noise)
    b = model.elbo(context_x[:, order], context_v[:, order], query_x, query_v, sigma=0.7, noise=noise)
    assert_close_rms(b.mean, a.mean, 1e-12, "mean")
    assert_close_rms(b.kl, a.kl, 1e-12, "kl")


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ValueError, match=r"attention_patch: expected one of \(4, 8, 16, 32, 64\), got 6"):
        tiny_attention_config(attention_patch=6)
    with pytest.raises(ValueError, match="attention_key_dim: expected a positive int, got 0"):
        tiny_attention_config(attention_key_dim=0)
    with pytest.raises(ValueError, match="config: expected model 'attention', got 'gqn'"):
        AttentionGQN(GQNConfig.preset("small"))
    model = AttentionGQN(tiny_attention_config())
    context_x, context_v, query_x, query_v = random_scene_batch(2, 2)
    with pytest.raises(ValueError, match=r"context_x: expected shape \[B, M, 3, 64, 64\]"):
        model.elbo(context_x[:, :, :, :32], context_v, query_x, query_v, sigma=0.7)
    with pytest.raises(ValueError, match="query_v: expected batch size 2 as in context_x, got 1"):
        model.generate(context_x, context_v, query_v[:1])
