"""The model API's input checks (gqn_fast.inputs) in both models: a float dtype other than the
model's, and an empty batch, get errors naming the argument instead of PyTorch's or a NaN."""

import contextlib

import pytest
import torch
from gqn_fast.reference import GQN as ReferenceGQN
from helpers import HostReads, random_scene_batch, tiny_config

from gqn_fast import GQN
from gqn_fast.inputs import values_trusted

MODELS = [ReferenceGQN, GQN]


def noise_for(config, batch, dtype=torch.float32):
    return torch.randn(config.L, batch, config.z_dim, 16, 16, dtype=dtype)


@pytest.mark.parametrize("model_class", MODELS)
@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_inputs_of_another_dtype_than_the_model_are_named(model_class, model_dtype, input_dtype):
    config = tiny_config()
    model = model_class(config).to(model_dtype)
    cx, cv, qx, qv = random_scene_batch(2, 2, dtype=model_dtype)
    noise = noise_for(config, 2, model_dtype)
    wrong = {
        name: t.to(input_dtype)
        for name, t in dict(context_x=cx, context_v=cv, query_x=qx, query_v=qv, noise=noise).items()
    }
    expected = f"expected the model's dtype {model_dtype}, got {input_dtype}"
    for name in ("context_x", "context_v", "query_x", "query_v", "noise"):
        given = dict(context_x=cx, context_v=cv, query_x=qx, query_v=qv, noise=noise)
        given[name] = wrong[name]
        with pytest.raises(TypeError, match=f"^{name}: {expected}"):
            model.elbo(
                given["context_x"],
                given["context_v"],
                given["query_x"],
                given["query_v"],
                sigma=0.7,
                noise=given["noise"],
            )
        if name != "query_x":
            with pytest.raises(TypeError, match=f"^{name}: {expected}"):
                model.generate(given["context_x"], given["context_v"], given["query_v"], noise=given["noise"])
    # The same inputs in the model's dtype run.
    assert torch.isfinite(model.elbo(cx, cv, qx, qv, sigma=0.7, noise=noise).loss)


@pytest.mark.parametrize("model_class", MODELS)
def test_an_empty_batch_is_named(model_class):
    config = tiny_config()
    model = model_class(config)
    cx, cv, qx, qv = random_scene_batch(0, 2)
    with pytest.raises(ValueError, match=r"context_x: expected a batch of at least one scene \(B >= 1\), got B = 0"):
        model.elbo(cx, cv, qx, qv, sigma=0.7)
    with pytest.raises(ValueError, match="B = 0"):
        model.generate(cx, cv, qv)


def test_autocast_still_takes_inputs_in_the_model_dtype():
    """Under autocast the inputs stay in the parameters' dtype (fp32); the check lets them through."""
    model = ReferenceGQN(tiny_config())
    cx, cv, qx, qv = random_scene_batch(1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.elbo(cx, cv, qx, qv, sigma=0.7).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("model_class", MODELS)
def test_trusted_values_are_not_read_back_and_shapes_still_checked(model_class):
    """Inside values_trusted() the ELBO reads nothing back to the host; outside it, its value
    checks do (and catch a NaN); shapes are checked in both."""
    model = model_class(tiny_config())
    cx, cv, qx, qv = random_scene_batch(2, 2)
    for trusted, expected in ((False, lambda n: n > 0), (True, lambda n: n == 0)):
        with HostReads() as counter, values_trusted() if trusted else contextlib.nullcontext():
            model.elbo(cx, cv, qx, qv, sigma=0.7)
        assert expected(counter.reads), (trusted, counter.reads)
    with pytest.raises(ValueError, match="query_x: contains NaN"):
        model.elbo(cx, cv, torch.full_like(qx, float("nan")), qv, sigma=0.7)
    with values_trusted(), pytest.raises(ValueError, match=r"query_x: expected shape \[B, 3, 64, 64\]"):
        model.elbo(cx, cv, qx[:, :, :32], qv, sigma=0.7)
