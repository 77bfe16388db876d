"""The reference GQN: shapes, ranges, gradients, learning, and its errors on bad input."""

import re

import pytest
import torch
from gqn_fast.reference import GQN
from helpers import random_scene_batch, tiny_config
from hypothesis import given
from hypothesis import strategies as st

from gqn_fast import GQNConfig
from gqn_fast.schedules import nll_floor

REPRESENTATIONS = ["tower", "pool", "pyramid"]


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("share_cores", [False, True])
def test_shapes_and_ranges(representation, share_cores):
    config = tiny_config(representation=representation, share_cores=share_cores, L=3)
    model = GQN(config)
    B, M = 2, 3
    context_x, context_v, query_x, query_v = random_scene_batch(B, M)

    r = model.representation(context_x[:, 0], context_v[:, 0])
    expected_grid = 16 if representation == "tower" else 1
    assert r.shape == (B, config.r_dim, expected_grid, expected_grid)
    assert model.represent(context_x, context_v).shape == (B, config.r_dim, 16, 16)
    assert len(model.inference_cores) == len(model.generator_cores) == (1 if share_cores else 3)

    out = model.elbo(context_x, context_v, query_x, query_v, sigma=0.7)
    assert out.loss.shape == ()
    assert out.nll.shape == (B,)
    assert out.kl.shape == (B, config.L)
    assert out.mean.shape == (B, 3, 64, 64)
    assert ((out.mean > 0) & (out.mean < 1)).all()
    assert (out.kl >= 0).all()
    # The NLL can only exceed the floor of a perfect mean image.
    assert (out.nll >= nll_floor(0.7)).all()
    torch.testing.assert_close(out.loss, (out.nll + out.kl.sum(1)).mean())

    image = model.generate(context_x, context_v, query_v)
    assert image.shape == (B, 3, 64, 64)
    assert ((image > 0) & (image < 1)).all()


def test_explicit_noise_makes_elbo_and_generate_deterministic():
    model = GQN(tiny_config())
    batch = random_scene_batch(2, 2)
    noise = torch.randn(2, 2, 2, 16, 16)
    a = model.elbo(*batch, sigma=1.0, noise=noise)
    b = model.elbo(*batch, sigma=1.0, noise=noise)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    g1 = model.generate(batch[0], batch[1], batch[3], noise=noise)
    g2 = model.generate(batch[0], batch[1], batch[3], noise=noise)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    # Different noise gives a different sample, so the noise is really used.
    g3 = model.generate(batch[0], batch[1], batch[3], noise=noise + 1)
    assert not torch.equal(g1, g3)


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("share_cores", [False, True])
def test_every_parameter_gets_a_gradient(representation, share_cores):
    torch.manual_seed(1)
    model = GQN(tiny_config(representation=representation, share_cores=share_cores, L=3))
    out = model.elbo(*random_scene_batch(2, 2), sigma=0.7)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # The spec's one dead weight: the canvas is zero at step 1, so the first unshared
    # inference core's canvas down-sampling weight multiplies zeros (its bias still learns).
    born_dead = set() if share_cores else {"inference_cores.0.downsample_u.weight"}
    for name in born_dead:
        assert grads.pop(name).abs().sum() == 0
    dead = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not dead, f"parameters with no gradient: {dead}"


def test_paper_preset_parameter_names():
    """The names are the public contract that gqn_fast.GQN loads (see docs/parameters.md)."""
    model = GQN(GQNConfig.preset("paper"))
    names = set(model.state_dict())
    patterns = [
        r"representation\.conv[1-8]\.(weight|bias)",
        r"inference_cores\.(\d+)\.(downsample_x|downsample_u|cell\.conv)\.(weight|bias)",
        r"generator_cores\.(\d+)\.(cell\.conv|upsample_h)\.(weight|bias)",
        r"(prior|posterior|observation)\.(weight|bias)",
    ]
    unmatched = [n for n in names if not any(re.fullmatch(p, n) for p in patterns)]
    assert not unmatched
    assert len(names) == 16 + 12 * 6 + 12 * 4 + 6
    assert model.inference_cores[0].cell.conv.weight.shape == (512, 3 + 7 + 256 + 128 + 128 + 128, 5, 5)
    assert model.generator_cores[0].cell.conv.weight.shape == (512, 7 + 256 + 3 + 128, 5, 5)
    assert model.generator_cores[0].upsample_h.weight.shape == (128, 128, 4, 4)
    assert model.prior.weight.shape == model.posterior.weight.shape == (6, 128, 5, 5)
    assert model.observation.weight.shape == (3, 128, 1, 1)


def test_small_preset_overfits_one_batch():
    """A few hundred Adam steps on one fixed batch must nearly reach the NLL floor.

    A model that ignores its query viewpoint, the canvas or z cannot: the two targets differ.
    """
    torch.manual_seed(0)
    model = GQN(GQNConfig.preset("small"))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    image = lambda a, b: torch.stack([xx * a, yy * b, ((xx > 0.5) & (yy < 0.4)).float() * 0.8])
    context_x = torch.stack([image(1, 0.3), image(0.2, 0.9)])[:, None]
    query_x = torch.stack([image(0.5, 1), image(1, 0.1)])
    context_v, query_v = torch.randn(2, 1, 7), torch.randn(2, 7)
    sigma = 0.2
    losses = []
    for _ in range(150):
        out = model.elbo(context_x, context_v, query_x, query_v, sigma)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item() - nll_floor(sigma))
    # Starts ~2e4 nats above the floor; the mean of the two targets alone would stay >1e3 above.
    assert losses[0] > 10_000
    assert min(losses[-10:]) < 200, losses[-10:]


# --- bad input -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return GQN(tiny_config())


def _call_elbo(model, **changes):
    context_x, context_v, query_x, query_v = random_scene_batch(2, 3)
    args = dict(context_x=context_x, context_v=context_v, query_x=query_x, query_v=query_v, sigma=0.7)
    args.update(changes)
    return model.elbo(**args)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (
            dict(context_x=torch.rand(2, 3, 3, 32, 32)),
            ValueError,
            r"context_x: expected shape \[B, M, 3, 64, 64\], got \[2, 3, 3, 32, 32\]",
        ),
        (
            dict(context_x=torch.rand(2, 3, 1, 64, 64)),
            ValueError,
            r"context_x: expected shape .*got \[2, 3, 1, 64, 64\]",
        ),
        (dict(context_x=torch.rand(2, 0, 3, 64, 64), context_v=torch.rand(2, 0, 7)), ValueError, r"M >= 1.*M = 0"),
        (dict(query_x=torch.rand(3, 3, 64, 64)), ValueError, r"query_x: expected batch size 2 as in context_x, got 3"),
        (dict(query_v=torch.rand(3, 7)), ValueError, r"query_v: expected batch size 2"),
        (dict(context_v=torch.rand(2, 3, 5)), ValueError, r"context_v: expected shape \[B, M, 7\], got \[2, 3, 5\]"),
        (dict(query_v=torch.rand(2, 5)), ValueError, r"query_v: expected shape \[B, 7\], got \[2, 5\]"),
        (dict(context_v=torch.rand(2, 2, 7)), ValueError, r"context_v: expected \[B, M\] = \[2, 3\]"),
        (dict(query_x=torch.rand(2, 3, 64, 64) * 2), ValueError, r"query_x: expected values in \[0, 1\]"),
        (dict(context_x=-torch.rand(2, 3, 3, 64, 64)), ValueError, r"context_x: expected values in \[0, 1\]"),
        (dict(query_v=torch.full((2, 7), float("nan"))), ValueError, r"query_v: contains NaN"),
        (dict(context_x=torch.full((2, 3, 3, 64, 64), float("nan"))), ValueError, r"context_x: contains NaN"),
        (
            dict(query_x=torch.zeros(2, 3, 64, 64, dtype=torch.uint8)),
            TypeError,
            r"query_x: expected a floating-point tensor, got dtype torch.uint8",
        ),
        (dict(query_x=[[0.5]]), TypeError, r"query_x: expected a torch.Tensor, got list"),
        (dict(sigma=0.0), ValueError, r"sigma: expected a positive"),
    ],
)
def test_bad_input_is_named(tiny_model, changes, error, message):
    with pytest.raises(error, match=message):
        _call_elbo(tiny_model, **changes)


def test_bad_noise_is_named(tiny_model):
    with pytest.raises(ValueError, match=r"noise: expected shape \[2, 2, 2, 16, 16\], got \[1, 2, 2, 16, 16\]"):
        _call_elbo(tiny_model, noise=torch.randn(1, 2, 2, 16, 16))
    context_x, context_v, _, query_v = random_scene_batch(2, 1)
    with pytest.raises(ValueError, match=r"noise: expected shape"):
        tiny_model.generate(context_x, context_v, query_v, noise=torch.randn(2, 2, 3, 16, 16))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(representation="resnet"), r"representation: expected one of"),
        (dict(L=0), r"L: expected a positive int, got 0"),
        (dict(z_dim=2.5), r"z_dim: expected a positive int"),
        (dict(r_dim=12, representation="pyramid"), r"r_dim: the pyramid net needs a multiple of 8"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        GQNConfig(**overrides)
    with pytest.raises(ValueError, match=r"preset: expected one of \[.*'paper', 'small'\], got 'huge'"):
        GQNConfig.preset("huge")


def test_presets():
    paper = GQNConfig.preset("paper")
    assert (paper.representation, paper.L, paper.z_dim, paper.share_cores) == ("tower", 12, 3, False)
    assert (paper.hidden, paper.canvas, paper.r_dim) == (128, 128, 256)
    assert GQNConfig.from_dict(paper.to_dict()) == paper
    with pytest.raises(ValueError, match="unknown fields"):
        GQNConfig.from_dict({"depth": 3})


@given(batch=st.integers(1, 3), views=st.integers(1, 4), share=st.booleans())
def test_any_batch_and_view_count(batch, views, share):
    model = GQN(tiny_config(share_cores=share))
    out = model.elbo(*random_scene_batch(batch, views), sigma=1.0)
    assert torch.isfinite(out.loss)
    assert out.kl.shape == (batch, 2)
