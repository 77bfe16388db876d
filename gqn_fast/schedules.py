"""The paper's annealing schedules (docs/spec.md, "Loss and schedules"), as pure functions of the step."""

import math

SIGMA_START, SIGMA_END, SIGMA_STEPS = 2.0, 0.7, 2e5
LR_START, LR_END, LR_STEPS = 5e-4, 5e-5, 1.6e6
PIXELS_PER_IMAGE = 3 * 64 * 64


def pixel_sigma(step: int, anneal_steps: float = SIGMA_STEPS) -> float:
    """Pixel standard deviation: 2.0 annealed linearly to 0.7 over 200k steps (the paper's
    `anneal_steps`; short runs may anneal faster), then 0.7."""
    return max(SIGMA_END + (SIGMA_START - SIGMA_END) * (1 - step / anneal_steps), SIGMA_END)


def learning_rate(step: int) -> float:
    """Adam learning rate: 5e-4 annealed linearly to 5e-5 over 1.6M steps, then 5e-5."""
    return max(LR_END + (LR_START - LR_END) * (1 - step / LR_STEPS), LR_END)


def nll_floor(sigma: float) -> float:
    """The NLL of a perfect mean image: 12288 * 0.5 * log(2 pi sigma^2) nats (6909 at 0.7).

    Training curves hit this constant and look stuck; report NLL minus it as well.
    """
    return PIXELS_PER_IMAGE * 0.5 * math.log(2 * math.pi * sigma**2)


def bits_per_dim(nats_per_image: float) -> float:
    """Nats per 3x64x64 image to bits per dimension."""
    return nats_per_image / (PIXELS_PER_IMAGE * math.log(2))
