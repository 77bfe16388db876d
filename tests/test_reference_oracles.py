"""The reference's building blocks against independent oracles from torch itself."""

import pytest
import torch
from gqn_fast.reference import ConvLSTMCell, gaussian_kl, gaussian_nll, transform_viewpoint
from helpers import assert_close_rms
from hypothesis import given
from hypothesis import strategies as st


@given(
    batch=st.integers(1, 4),
    in_features=st.integers(1, 9),
    hidden=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_conv_lstm_1x1_equals_lstm_cell(batch, in_features, hidden, seed):
    torch.manual_seed(seed)
    lstm = torch.nn.LSTMCell(in_features, hidden).double()
    cell = ConvLSTMCell(in_features, hidden, kernel_size=1).double()
    with torch.no_grad():
        w = torch.cat([lstm.weight_ih, lstm.weight_hh], dim=1)
        cell.conv.weight.copy_(w[:, :, None, None])
        cell.conv.bias.copy_(lstm.bias_ih + lstm.bias_hh)
    x = torch.randn(batch, in_features, dtype=torch.float64)
    h = torch.randn(batch, hidden, dtype=torch.float64)
    c = torch.randn(batch, hidden, dtype=torch.float64)
    h_ref, c_ref = lstm(x, (h, c))
    grid = lambda t: t[:, :, None, None]
    h_out, c_out = cell(grid(x), grid(h), grid(c))
    assert_close_rms(h_out[:, :, 0, 0], h_ref, 1e-12, "h")
    assert_close_rms(c_out[:, :, 0, 0], c_ref, 1e-12, "c")


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_gaussian_kl_equals_torch_distributions(shape, seed):
    torch.manual_seed(seed)
    mu_q, mu_p = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    sigma_q = torch.rand(shape, dtype=torch.float64) * 3 + 0.05
    sigma_p = torch.rand(shape, dtype=torch.float64) * 3 + 0.05
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_q, sigma_q), torch.distributions.Normal(mu_p, sigma_p)
    )
    assert_close_rms(gaussian_kl(mu_q, sigma_q, mu_p, sigma_p), expected, 1e-12, "kl")


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    sigma=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_gaussian_nll_equals_normal_log_prob(shape, sigma, seed):
    torch.manual_seed(seed)
    x, mean = torch.rand(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    expected = -torch.distributions.Normal(mean, sigma).log_prob(x)
    assert_close_rms(gaussian_nll(x, mean, sigma), expected, 1e-12, "nll")


def test_viewpoint_order_is_cos_before_sin():
    yaw, pitch = 0.3, -1.1
    camera = torch.tensor([[1.0, 2.0, 3.0, yaw, pitch]], dtype=torch.float64)
    v = transform_viewpoint(camera)
    expected = torch.tensor(
        [
            [
                1.0,
                2.0,
                3.0,
                torch.cos(torch.tensor(yaw)),
                torch.sin(torch.tensor(yaw)),
                torch.cos(torch.tensor(pitch)),
                torch.sin(torch.tensor(pitch)),
            ]
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(v, expected)


def test_viewpoint_rejects_wrong_width():
    with pytest.raises(ValueError, match="camera: expected a last dimension of 5"):
        transform_viewpoint(torch.zeros(2, 7))
