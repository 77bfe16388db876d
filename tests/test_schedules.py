import math

import pytest

from gqn_fast.schedules import bits_per_dim, learning_rate, nll_floor, pixel_sigma


@pytest.mark.parametrize(
    "step, expected",
    [(0, 2.0), (100_000, 1.35), (200_000, 0.7), (1_000_000, 0.7)],
)
def test_pixel_sigma(step, expected):
    assert pixel_sigma(step) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 5e-4), (800_000, 2.75e-4), (1_600_000, 5e-5), (5_000_000, 5e-5)],
)
def test_learning_rate(step, expected):
    assert learning_rate(step) == pytest.approx(expected, rel=1e-12)


def test_nll_floor_at_final_sigma_is_6909_nats():
    assert nll_floor(0.7) == pytest.approx(6909.0, abs=1.0)
    assert nll_floor(0.7) == pytest.approx(12288 * 0.5 * math.log(2 * math.pi * 0.49))


def test_bits_per_dim():
    assert bits_per_dim(12288 * math.log(2)) == pytest.approx(1.0)


def test_pixel_sigma_anneals_over_a_chosen_length():
    assert pixel_sigma(500, anneal_steps=1000) == pytest.approx(1.35)
    assert pixel_sigma(1000, anneal_steps=1000) == pytest.approx(0.7)
    assert pixel_sigma(5000, anneal_steps=1000) == pytest.approx(0.7)
