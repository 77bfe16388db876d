"""The reference Consistent GQN (JUMP): shapes, one latent per scene, the loss against its
definition, target sets, gradients and errors on bad input."""

import math

import pytest
import torch
from gqn_fast.reference import transform_viewpoint
from gqn_fast.reference.distributions import gaussian_kl
from gqn_fast.reference.jump import JUMP
from helpers import random_scene_batch, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from gqn_fast import GQNConfig
from gqn_fast.models import model_class


def jump_config(**overrides):
    return tiny_config(model="jump", **overrides)


def target_set(batch, K, dtype=torch.float32):
    """query_x [B, K, 3, 64, 64] and query_v [B, K, 7]."""
    return torch.rand(batch, K, 3, 64, 64, dtype=dtype), transform_viewpoint(torch.randn(batch, K, 5, dtype=dtype))


@pytest.mark.parametrize("representation, share_cores", [("tower", False), ("pool", True), ("pyramid", False)])
def test_shapes_ranges_and_loss(representation, share_cores):
    config = jump_config(representation=representation, share_cores=share_cores, L=3)
    model = JUMP(config)
    assert len(model.latent_cores) == len(model.inference_cores) == len(model.renderer_cores)
    assert len(model.renderer_cores) == (1 if share_cores else 3)
    B, K = 2, 3
    context_x, context_v, query_x, query_v = random_scene_batch(B, 2)
    one = model.elbo(context_x, context_v, query_x, query_v, sigma=0.7)
    assert one.nll.shape == (B,) and one.kl.shape == (B, config.L) and one.mean.shape == (B, 3, 64, 64)
    targets_x, targets_v = target_set(B, K)
    out = model.elbo(context_x, context_v, targets_x, targets_v, sigma=0.7)
    assert out.mean.shape == (B, K, 3, 64, 64) and out.kl.shape == (B, config.L)
    assert ((out.mean > 0) & (out.mean < 1)).all() and (out.kl >= 0).all()
    torch.testing.assert_close(out.loss, (out.nll + out.kl.sum(1)).mean())
    # The NLL is the Gaussian's over every pixel of every target, the mean's own (an oracle).
    normal = torch.distributions.Normal(out.mean, 0.7)
    torch.testing.assert_close(out.nll, -normal.log_prob(targets_x).sum(dim=(1, 2, 3, 4)))
    assert model.generate(context_x, context_v, query_v).shape == (B, 3, 64, 64)
    assert model.generate(context_x, context_v, targets_v).shape == (B, K, 3, 64, 64)


def test_kl_is_the_latent_steps_gaussian_kl():
    """kl [B, L] sums, at each step, KL(q || p) of the same posterior and prior the loop reads: the
    oracle here is torch.distributions on the heads' outputs, recomputed step by step."""
    torch.manual_seed(0)
    config = jump_config(L=2, share_cores=False)
    model = JUMP(config).double()
    context_x, context_v, query_x, query_v = random_scene_batch(1, 2, dtype=torch.float64)
    noise = torch.randn(config.L, 1, config.z_dim, 16, 16, dtype=torch.float64)
    out = model.elbo(context_x, context_v, query_x, query_v, sigma=0.7, noise=noise)
    r = model.represent(context_x, context_v)
    r_post = r + model.represent(query_x[:, None], query_v[:, None])
    zeros = torch.zeros(1, config.hidden, 16, 16, dtype=torch.float64)
    h_g = c_g = h_e = c_e = zeros
    z = torch.zeros(1, config.z_dim, 16, 16, dtype=torch.float64)
    for step in range(config.L):
        h_g, c_g = model.latent_cores[step](h_g, c_g, r=r, z=z)
        h_e, c_e = model.inference_cores[step](h_e, c_e, r=r_post, h_g=h_g)
        q, p = (
            torch.distributions.Normal(*model._gaussian(head, h))
            for head, h in ((model.posterior, h_e), (model.prior, h_g))
        )
        expected = torch.distributions.kl_divergence(q, p).sum()
        torch.testing.assert_close(out.kl[0, step], expected)
        torch.testing.assert_close(gaussian_kl(q.loc, q.scale, p.loc, p.scale).sum(), expected)
        z = q.loc + q.scale * noise[step]


def test_views_of_one_latent_agree():
    """The renderer is deterministic and reads each target alone: a viewpoint rendered twice in one
    set, or alone, or beside others, from one z gives the same image; two independent z's do not."""
    torch.manual_seed(1)
    model = JUMP(jump_config(L=2))
    context_x, context_v, _, _ = random_scene_batch(2, 2)
    _, targets_v = target_set(2, 3)
    twice = torch.cat([targets_v, targets_v[:, :1]], dim=1)
    z = model.sample_latent(context_x, context_v)
    images = model.render(z, twice)
    assert torch.equal(images[:, 0], images[:, 3])
    alone = model.render(z, twice[:, 1:2])
    torch.testing.assert_close(alone[:, 0], images[:, 1], rtol=0, atol=1e-6)
    other = model.render(model.sample_latent(context_x, context_v), twice)
    assert not torch.allclose(other, images)
    # generate draws one z per scene for all its targets: the same viewpoint twice agrees.
    generated = model.generate(context_x, context_v, twice)
    torch.testing.assert_close(generated[:, 0], generated[:, 3], rtol=0, atol=1e-6)


def test_one_target_is_a_set_of_one_and_targets_are_a_set():
    """query_x [B, 3, 64, 64] is the set of one [B, 1, 3, 64, 64]; the order of a set's targets
    changes nothing (r' and the NLL are sums over them)."""
    torch.manual_seed(2)
    config = jump_config(L=2)
    model = JUMP(config).double()
    context_x, context_v, query_x, query_v = random_scene_batch(2, 2, dtype=torch.float64)
    noise = torch.randn(config.L, 2, config.z_dim, 16, 16, dtype=torch.float64)
    one = model.elbo(context_x, context_v, query_x, query_v, sigma=0.7, noise=noise)
    as_set = model.elbo(context_x, context_v, query_x[:, None], query_v[:, None], sigma=0.7, noise=noise)
    torch.testing.assert_close(one.loss, as_set.loss)
    torch.testing.assert_close(one.mean, as_set.mean[:, 0])
    targets_x, targets_v = target_set(2, 3, torch.float64)
    order = torch.tensor([2, 0, 1])
    a = model.elbo(context_x, context_v, targets_x, targets_v, sigma=0.7, noise=noise)
    b = model.elbo(context_x, context_v, targets_x[:, order], targets_v[:, order], sigma=0.7, noise=noise)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.mean[:, order], b.mean)


@given(representation=st.sampled_from(["tower", "pool", "pyramid"]), share_cores=st.booleans(), K=st.integers(1, 2))
@settings(max_examples=4, deadline=None)
def test_every_parameter_gets_a_gradient(representation, share_cores, K):
    model = JUMP(jump_config(representation=representation, share_cores=share_cores, L=2))
    context_x, context_v, _, _ = random_scene_batch(2, 1)
    model.elbo(context_x, context_v, *target_set(2, K), sigma=0.7).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_generate_from_the_represented_r_is_generate():
    torch.manual_seed(3)
    config = jump_config(representation="pool", L=2)
    model = JUMP(config)
    context_x, context_v, _, query_v = random_scene_batch(2, 2)
    noise = torch.randn(config.L, 2, config.z_dim, 16, 16)
    expected = model.generate(context_x, context_v, query_v, noise=noise)
    r = model.representation(context_x.flatten(0, 1), context_v.flatten(0, 1)).view(2, 2, -1, 1, 1).sum(1)
    torch.testing.assert_close(model.generate_from(r, query_v, noise=noise), expected)


def test_preset_and_model_kind():
    config = GQNConfig.preset("jump-small")
    assert config.model == "jump"
    assert model_class(config, "reference") is JUMP
    names = list(JUMP(config).state_dict())
    assert "latent_cores.0.cell.conv.weight" in names and "renderer_cores.0.upsample_h.weight" in names
    assert "inference_cores.1.cell.conv.weight" not in names  # shared cores
    # The renderer reads the whole latent: L z_dim channels beside v and its state.
    weight = JUMP(config).renderer_cores[0].cell.conv.weight
    assert weight.shape[1] == 7 + config.L * config.z_dim + config.hidden


@pytest.mark.parametrize(
    "targets, message",
    [
        (lambda x, v: (x, v[:, :2]), r"query_x: expected \[B, K\] = \[2, 2\] as in query_v, got \[2, 3\]"),
        (lambda x, v: (x[:, :, 0], v), r"query_x: expected shape \[B, K, 3, 64, 64\]"),
        (lambda x, v: (x[:1], v[:1]), r"query_v: expected batch size 2 as in context_x, got 1"),
        (lambda x, v: (x * math.nan, v), r"query_x: contains NaN or inf"),
        (lambda x, v: (x, v[:, :0]), r"query_v: expected at least one target view per scene"),
    ],
)
def test_bad_targets_are_named(targets, message):
    model = JUMP(jump_config(L=1))
    context_x, context_v, _, _ = random_scene_batch(2, 1)
    query_x, query_v = targets(*target_set(2, 3))
    with pytest.raises(ValueError, match=message):
        model.elbo(context_x, context_v, query_x, query_v, sigma=0.7)
