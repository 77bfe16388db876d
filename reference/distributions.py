"""The two densities in GQN's loss, in closed form."""

import math

import torch


def gaussian_kl(mu_q, sigma_q, mu_p, sigma_p) -> torch.Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) per element."""
    return torch.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5


def gaussian_nll(x, mean, sigma) -> torch.Tensor:
    """-log N(x | mean, sigma^2) per element; sigma is a number or a tensor."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    return 0.5 * ((x - mean) / sigma) ** 2 + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
