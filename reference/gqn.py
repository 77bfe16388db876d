"""The reference GQN: the plain PyTorch model that every test holds the fast path to.

Written to be read next to docs/spec.md, step by step, with no speed tricks.

Parameter names (a public contract: gqn_fast.GQN loads the same state_dict), with
K = L cores, or K = 1 when share_cores is True:
  representation.conv{1..8}.{weight,bias}        tower and pool
  representation.conv{1..4}.{weight,bias}        pyramid
  inference_cores.{0..K-1}.downsample_x.{weight,bias}
  inference_cores.{0..K-1}.downsample_u.{weight,bias}
  inference_cores.{0..K-1}.cell.conv.{weight,bias}
  generator_cores.{0..K-1}.cell.conv.{weight,bias}
  generator_cores.{0..K-1}.upsample_h.{weight,bias}
  prior.{weight,bias}  posterior.{weight,bias}  observation.{weight,bias}
The inference cell's input channels are ordered [x_q down, v_q, r, h_g, u down, h_e];
the generator cell's [v_q, r, z, h_g]. See docs/parameters.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gqn_fast.reference.cores import GeneratorCore, InferenceCore
from gqn_fast.reference.distributions import gaussian_kl, gaussian_nll
from gqn_fast.reference.representation import NETS, tile
from torch import nn

from gqn_fast.config import GRID_SIZE, VIEWPOINT_DIM, GQNConfig
from gqn_fast.inputs import check_context, check_noise, check_query, check_representation, check_sigma


@dataclass
class ELBO:
    """What `elbo` returns. loss: mean negative ELBO over the batch (scalar, nats per image);
    nll [B]: -log p(x_q | z) per scene; kl [B, L]: each step's KL; mean [B, 3, 64, 64]."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    mean: torch.Tensor


class GQN(nn.Module):
    def __init__(self, config: GQNConfig | None = None):
        super().__init__()
        config = GQNConfig() if config is None else config
        if not isinstance(config, GQNConfig):
            raise TypeError(f"config: expected a GQNConfig, got {type(config).__name__}")
        self.config = config
        c, v = config, VIEWPOINT_DIM
        self.representation = NETS[c.representation](c.r_dim, v)
        self._add_cores_and_heads()

    def _add_cores_and_heads(self) -> None:
        """The cores (K = L, or 1 when share_cores), then the prior, posterior and output heads."""
        c, v = self.config, VIEWPOINT_DIM
        n_cores = 1 if c.share_cores else c.L
        self.inference_cores = nn.ModuleList(InferenceCore(v, c.r_dim, c.hidden, c.canvas) for _ in range(n_cores))
        self.generator_cores = nn.ModuleList(
            GeneratorCore(v, c.r_dim, c.z_dim, c.hidden, c.canvas) for _ in range(n_cores)
        )
        self.prior = nn.Conv2d(c.hidden, 2 * c.z_dim, kernel_size=5, padding=2)
        self.posterior = nn.Conv2d(c.hidden, 2 * c.z_dim, kernel_size=5, padding=2)
        self.observation = nn.Conv2d(c.canvas, 3, kernel_size=1)

    def check_inputs(self, context_x, context_v, query_v, query_x=None, sigma=None, noise=None):
        """Raise ValueError / TypeError naming any argument of elbo / generate that is wrong."""
        dtype = self.prior.weight.dtype  # the inputs must be of the model's dtype
        check_context(context_x, context_v, dtype)
        check_query(context_x, query_v, query_x, dtype)
        if sigma is not None:
            check_sigma(sigma)
        c = self.config
        check_noise(noise, c.L, query_v.shape[0], c.z_dim, GRID_SIZE, dtype)

    def represent(self, context_x: torch.Tensor, context_v: torch.Tensor) -> torch.Tensor:
        """r = sum over the M context views of psi(x^k, v^k), tiled to 16x16: [B, r_dim, 16, 16]."""
        B, M = context_x.shape[:2]
        r_k = self.representation(context_x.flatten(0, 1), context_v.flatten(0, 1))
        r = r_k.view(B, M, *r_k.shape[1:]).sum(dim=1)
        return r.expand(-1, -1, GRID_SIZE, GRID_SIZE)  # a 1x1 r is tiled, never learned

    def _core(self, cores: nn.ModuleList, step: int) -> nn.Module:
        return cores[0] if self.config.share_cores else cores[step]

    def _initial_state(self, batch: int, like: torch.Tensor):
        c = self.config
        zeros = lambda channels, size: like.new_zeros(batch, channels, size, size)
        return zeros(c.hidden, GRID_SIZE), zeros(c.hidden, GRID_SIZE), zeros(c.canvas, 4 * GRID_SIZE)

    def _gaussian(self, head: nn.Conv2d, h: torch.Tensor):
        mu, s = head(h).chunk(2, dim=1)
        return mu, F.softplus(s)

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        """The negative evidence lower bound of query_x seen from query_v, given the context.

        sigma: the pixel standard deviation (see gqn_fast.schedules.pixel_sigma).
        noise: optional [L, B, z_dim, 16, 16] standard-normal draws for the posterior samples.
        """
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        r = self.represent(context_x, context_v)
        return self._elbo(lambda h_g: r, query_x, query_v, sigma, noise)

    def _elbo(self, read, query_x, query_v, sigma, noise) -> ELBO:
        """elbo's steps from checked inputs. read(h_g): what the cores read as r at a step whose
        generator state is h_g (GQN's r at every step; attention GQN attends with h_g)."""
        c = self.config
        B = query_x.shape[0]

        v_q = tile(query_v, GRID_SIZE)
        h_g, c_g, u = self._initial_state(B, query_x)
        h_e, c_e, _ = self._initial_state(B, query_x)
        kls = []
        for step in range(c.L):
            r = read(h_g)
            mu_p, sigma_p = self._gaussian(self.prior, h_g)
            inference = self._core(self.inference_cores, step)
            h_e, c_e = inference(query_x, v_q, r, h_g, u, h_e, c_e)
            mu_q, sigma_q = self._gaussian(self.posterior, h_e)
            eps = torch.randn_like(mu_q) if noise is None else noise[step]
            z = mu_q + sigma_q * eps
            kls.append(gaussian_kl(mu_q, sigma_q, mu_p, sigma_p).sum(dim=(1, 2, 3)))
            generator = self._core(self.generator_cores, step)
            h_g, c_g, u = generator(v_q, r, z, h_g, c_g, u)

        mean = torch.sigmoid(self.observation(u))
        nll = gaussian_nll(query_x, mean, sigma).sum(dim=(1, 2, 3))
        kl = torch.stack(kls, dim=1)
        loss = (nll + kl.sum(dim=1)).mean()
        return ELBO(loss=loss, nll=nll, kl=kl, mean=mean)

    def forward(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        """Calling the model computes its ELBO (what DistributedDataParallel wraps)."""
        return self.elbo(context_x, context_v, query_x, query_v, sigma, noise)

    @torch.no_grad()
    def generate(self, context_x, context_v, query_v, noise=None) -> torch.Tensor:
        """The mean image [B, 3, 64, 64] of a scene seen from query_v, z drawn from the prior."""
        self.check_inputs(context_x, context_v, query_v, noise=noise)
        return self._generate(self.represent(context_x, context_v), query_v, noise)

    @torch.no_grad()
    def generate_from(self, r, query_v, noise=None) -> torch.Tensor:
        """`generate` from a scene representation r instead of context views (scene algebra):
        [B, r_dim, 16, 16] as `represent` returns it, or [B, r_dim, 1, 1] untiled (pool, pyramid)."""
        c = self.config
        dtype = self.prior.weight.dtype  # the inputs must be of the model's dtype
        check_representation(r, query_v, c.r_dim, GRID_SIZE, c.r_is_vector, dtype)
        check_noise(noise, c.L, query_v.shape[0], c.z_dim, GRID_SIZE, dtype)
        return self._generate(r, query_v, noise)

    def _generate(self, r, query_v, noise) -> torch.Tensor:
        """generate's and generate_from's steps, from a checked r."""
        r = r.expand(-1, -1, GRID_SIZE, GRID_SIZE)
        return self._draw(lambda h_g: r, query_v, noise)

    def _draw(self, read, query_v, noise) -> torch.Tensor:
        """The steps of generation, z from the prior; read(h_g) as in _elbo."""
        c = self.config
        B = query_v.shape[0]

        v_q = tile(query_v, GRID_SIZE)
        h_g, c_g, u = self._initial_state(B, query_v)
        for step in range(c.L):
            r = read(h_g)
            mu_p, sigma_p = self._gaussian(self.prior, h_g)
            eps = torch.randn_like(mu_p) if noise is None else noise[step]
            z = mu_p + sigma_p * eps
            generator = self._core(self.generator_cores, step)
            h_g, c_g, u = generator(v_q, r, z, h_g, c_g, u)
        return torch.sigmoid(self.observation(u))
