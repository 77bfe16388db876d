"""The reference Consistent GQN (JUMP): one latent per scene, every target view rendered from it.

Kumar et al. 2018, "Consistent Generative Query Networks". GQN (reference/gqn.py) draws a
latent per query, so two views of one scene drawn from the prior need not agree. JUMP draws one
latent z per scene and renders every target view from it with a deterministic renderer, so all
the views of one z agree. Written to be read, with no speed tricks.

The equations, with r = sum_k psi(x^k, v^k) over the M context views (the representation nets of
GQN_SPEC.md) and r' = r + sum_t psi(x^t, v^t) over the K target views (the posterior's):
  latent model, a DRAW-style ConvLSTM over l = 1..L on the 16x16 grid, z_0 = 0, states zero:
    (h_g, c_g) = cell_g(cat[r, z_{l-1}], h_g, c_g)         the latent core
    p(z_l | z_<l, r)      = N(mu_p, sigma_p^2),  (mu_p, s_p) = conv5x5(h_g), sigma_p = softplus(s_p)
    (h_e, c_e) = cell_e(cat[r', h_g], h_e, c_e)            the inference core
    q(z_l | z_<l, r, r')  = N(mu_q, sigma_q^2),  (mu_q, s_q) = conv5x5(h_e)
    z_l = mu_q + sigma_q eps when training, mu_p + sigma_p eps when generating
  the scene latent z = cat[z_1, ..., z_L] ([L z_dim, 16, 16]), one per scene;
  renderer, a deterministic ConvLSTM over L steps for each target viewpoint v, states zero:
    (h_d, c_d) = cell_d(cat[v tiled, z], h_d, c_d);  u = u + convT_k4s4(h_d)
    mean image = sigmoid(conv1x1(u_L))
  loss per scene = sum over the K targets of -log N(x^t | mean^t, sigma^2) + sum_l KL_l(q || p).

Choices where the paper is silent (or where this follows GQN_SPEC.md instead):
- The latent core reads z_{l-1} before the prior is read (gqnlib's order), so the prior of z_1
  already depends on r; z_0 = 0.
- The posterior adds the targets' representation to the context's (r' = r + r_targets), the
  same net for both, rather than reading the targets in a net of its own.
- The renderer runs L steps (the latent model's count) and does not read its canvas: it is
  GQN's generator core with z in place of [r, z_l]. Hidden and canvas widths as in GQNConfig.
- share_cores shares the weights over the L steps of each of the three cores.

Parameter names (gqn_fast.jump.JUMP loads the same state_dict), K = L cores or 1 when shared:
  representation.*                                  as GQN's (NETS)
  latent_cores.{0..K-1}.cell.conv.{weight,bias}     inputs [r, z, h_g]
  inference_cores.{0..K-1}.cell.conv.{weight,bias}  inputs [r, h_g, h_e] (r is r' there)
  renderer_cores.{0..K-1}.cell.conv.{weight,bias}   inputs [v_q, z, h_d]
  renderer_cores.{0..K-1}.upsample_h.{weight,bias}
  prior.{weight,bias}  posterior.{weight,bias}  observation.{weight,bias}

Targets: query_x [B, 3, 64, 64] with query_v [B, 7] (one per scene, as the training loader
gives), or query_x [B, K, 3, 64, 64] with query_v [B, K, 7]; outputs follow the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gqn_fast.reference.cores import ConvLSTMCell, cell_inputs
from gqn_fast.reference.distributions import gaussian_kl, gaussian_nll
from gqn_fast.reference.gqn import ELBO
from gqn_fast.reference.representation import NETS, tile
from torch import nn

from gqn_fast.config import GRID_SIZE, VIEWPOINT_DIM, GQNConfig
from gqn_fast.inputs import check_context, check_noise, check_representation, check_sigma, check_targets

# Each core's own state, last in its layout (reference/cores.py: cell_inputs).
LATENT_STATE = "h_g"
INFERENCE_STATE = "h_e"
RENDERER_STATE = "h_d"


def latent_layout(r_dim: int, z_dim: int, hidden: int) -> dict[str, int]:
    """The latent core's input channels in concatenation order: name -> count."""
    return {"r": r_dim, "z": z_dim, LATENT_STATE: hidden}


def inference_layout(r_dim: int, hidden: int) -> dict[str, int]:
    """The inference core's input channels (its r is the posterior's r')."""
    return {"r": r_dim, "h_g": hidden, INFERENCE_STATE: hidden}


def renderer_layout(v_dim: int, latent: int, hidden: int) -> dict[str, int]:
    """The renderer core's input channels; z is the whole scene latent, L z_dim channels."""
    return {"v_q": v_dim, "z": latent, RENDERER_STATE: hidden}


class Core(nn.Module):
    """A ConvLSTM cell over named inputs, concatenated in its layout's order (its state last)."""

    def __init__(self, layout: dict[str, int], state: str):
        super().__init__()
        self.layout = layout
        self.input_groups = cell_inputs(layout, state)
        self.cell = ConvLSTMCell(sum(layout[name] for name in self.input_groups), layout[state])

    def forward(self, h, c, **inputs):
        return self.cell(torch.cat([inputs[name] for name in self.input_groups], dim=1), h, c)


class RendererCore(Core):
    """A core that also draws its new state on the 64x64 canvas."""

    def __init__(self, layout: dict[str, int], canvas: int):
        super().__init__(layout, RENDERER_STATE)
        self.upsample_h = nn.ConvTranspose2d(layout[RENDERER_STATE], canvas, kernel_size=4, stride=4)

    def forward(self, h, c, u, **inputs):
        h, c = super().forward(h, c, **inputs)
        return h, c, u + self.upsample_h(h)


def as_target_set(query_v, query_x=None):
    """(query_v [B, K, 7], query_x [B, K, 3, 64, 64] or None): one target is a set of one."""
    if query_v.dim() == 3:
        return query_v, query_x
    return query_v[:, None], None if query_x is None else query_x[:, None]


class JUMP(nn.Module):
    def __init__(self, config: GQNConfig | None = None):
        super().__init__()
        config = GQNConfig(model="jump") if config is None else config
        if not isinstance(config, GQNConfig):
            raise TypeError(f"config: expected a GQNConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.representation = NETS[c.representation](c.r_dim, VIEWPOINT_DIM)
        n_cores = 1 if c.share_cores else c.L
        self.latent_cores = nn.ModuleList(
            Core(latent_layout(c.r_dim, c.z_dim, c.hidden), LATENT_STATE) for _ in range(n_cores)
        )
        self.inference_cores = nn.ModuleList(
            Core(inference_layout(c.r_dim, c.hidden), INFERENCE_STATE) for _ in range(n_cores)
        )
        self.renderer_cores = nn.ModuleList(
            RendererCore(renderer_layout(VIEWPOINT_DIM, c.L * c.z_dim, c.hidden), c.canvas) for _ in range(n_cores)
        )
        self.prior = nn.Conv2d(c.hidden, 2 * c.z_dim, kernel_size=5, padding=2)
        self.posterior = nn.Conv2d(c.hidden, 2 * c.z_dim, kernel_size=5, padding=2)
        self.observation = nn.Conv2d(c.canvas, 3, kernel_size=1)

    def check_inputs(self, context_x, context_v, query_v, query_x=None, sigma=None, noise=None):
        """Raise ValueError / TypeError naming any argument of elbo / generate that is wrong."""
        dtype = self.prior.weight.dtype  # the inputs must be of the model's dtype
        check_context(context_x, context_v, dtype)
        check_targets(context_x, query_v, query_x, dtype)
        if sigma is not None:
            check_sigma(sigma)
        c = self.config
        check_noise(noise, c.L, query_v.shape[0], c.z_dim, GRID_SIZE, dtype)

    def represent(self, context_x: torch.Tensor, context_v: torch.Tensor) -> torch.Tensor:
        """r = sum over the M views of psi(x^k, v^k), tiled to 16x16: [B, r_dim, 16, 16]."""
        B, M = context_x.shape[:2]
        r_k = self.representation(context_x.flatten(0, 1), context_v.flatten(0, 1))
        r = r_k.view(B, M, *r_k.shape[1:]).sum(dim=1)
        return r.expand(-1, -1, GRID_SIZE, GRID_SIZE)  # a 1x1 r is tiled, never learned

    def _core(self, cores: nn.ModuleList, step: int) -> nn.Module:
        return cores[0] if self.config.share_cores else cores[step]

    def _zeros(self, batch: int, channels: int, like: torch.Tensor, size: int = GRID_SIZE) -> torch.Tensor:
        return like.new_zeros(batch, channels, size, size)

    def _gaussian(self, head: nn.Conv2d, h: torch.Tensor):
        mu, s = head(h).chunk(2, dim=1)
        return mu, F.softplus(s)

    def _latent(self, r, noise, r_posterior=None):
        """(z [B, L z_dim, 16, 16], kl [B, L]): z from the posterior given r_posterior (kl its KL
        from the prior at each step), else from the prior (kl None)."""
        c = self.config
        B = r.shape[0]
        h_g, c_g = self._zeros(B, c.hidden, r), self._zeros(B, c.hidden, r)
        h_e, c_e = self._zeros(B, c.hidden, r), self._zeros(B, c.hidden, r)
        z = self._zeros(B, c.z_dim, r)  # z_0
        zs, kls = [], []
        for step in range(c.L):
            h_g, c_g = self._core(self.latent_cores, step)(h_g, c_g, r=r, z=z)
            mu_p, sigma_p = self._gaussian(self.prior, h_g)
            if r_posterior is None:
                eps = torch.randn_like(mu_p) if noise is None else noise[step]
                z = mu_p + sigma_p * eps
            else:
                h_e, c_e = self._core(self.inference_cores, step)(h_e, c_e, r=r_posterior, h_g=h_g)
                mu_q, sigma_q = self._gaussian(self.posterior, h_e)
                eps = torch.randn_like(mu_q) if noise is None else noise[step]
                z = mu_q + sigma_q * eps
                kls.append(gaussian_kl(mu_q, sigma_q, mu_p, sigma_p).sum(dim=(1, 2, 3)))
            zs.append(z)
        return torch.cat(zs, dim=1), torch.stack(kls, dim=1) if kls else None

    def render(self, z: torch.Tensor, query_v: torch.Tensor) -> torch.Tensor:
        """The mean images [B, K, 3, 64, 64] of the K viewpoints query_v [B, K, 7] of each scene,
        all drawn from that scene's one latent z [B, L z_dim, 16, 16] (deterministic)."""
        c = self.config
        B, K = query_v.shape[:2]
        z = z.repeat_interleave(K, dim=0)  # [B K, L z_dim, 16, 16]: every target reads its scene's z
        v_q = tile(query_v.flatten(0, 1), GRID_SIZE)
        h_d, c_d = self._zeros(B * K, c.hidden, z), self._zeros(B * K, c.hidden, z)
        u = self._zeros(B * K, c.canvas, z, 4 * GRID_SIZE)
        for step in range(c.L):
            h_d, c_d, u = self._core(self.renderer_cores, step)(h_d, c_d, u, v_q=v_q, z=z)
        mean = torch.sigmoid(self.observation(u))
        return mean.view(B, K, *mean.shape[1:])

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        """The negative evidence lower bound of the target views query_x seen from query_v, given
        the context: nll [B] sums over a scene's targets, kl [B, L] is the one latent's per step,
        mean has query_x's shape.

        sigma: the pixel standard deviation (see gqn_fast.schedules.pixel_sigma).
        noise: optional [L, B, z_dim, 16, 16] standard-normal draws for the posterior samples.
        """
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        targets_v, targets_x = as_target_set(query_v, query_x)
        r = self.represent(context_x, context_v)
        r_posterior = r + self.represent(targets_x, targets_v)
        z, kl = self._latent(r, noise, r_posterior)
        mean = self.render(z, targets_v)
        nll = gaussian_nll(targets_x, mean, sigma).sum(dim=(1, 2, 3, 4))
        loss = (nll + kl.sum(dim=1)).mean()
        return ELBO(loss=loss, nll=nll, kl=kl, mean=mean.view_as(query_x))

    def forward(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        """Calling the model computes its ELBO (what DistributedDataParallel wraps)."""
        return self.elbo(context_x, context_v, query_x, query_v, sigma, noise)

    @torch.no_grad()
    def sample_latent(self, context_x, context_v, noise=None) -> torch.Tensor:
        """One scene latent z [B, L z_dim, 16, 16] per scene, drawn from the prior given the context."""
        c = self.config
        check_context(context_x, context_v, self.prior.weight.dtype)
        check_noise(noise, c.L, context_x.shape[0], c.z_dim, GRID_SIZE, self.prior.weight.dtype)
        return self._latent(self.represent(context_x, context_v), noise)[0]

    @torch.no_grad()
    def generate(self, context_x, context_v, query_v, noise=None) -> torch.Tensor:
        """The mean images of a scene seen from query_v, from one z per scene drawn from the prior:
        [B, 3, 64, 64] for query_v [B, 7], [B, K, 3, 64, 64] for query_v [B, K, 7]."""
        self.check_inputs(context_x, context_v, query_v, noise=noise)
        return self._generate(self.represent(context_x, context_v), query_v, noise)

    @torch.no_grad()
    def generate_from(self, r, query_v, noise=None) -> torch.Tensor:
        """`generate` from a scene representation r instead of context views: [B, r_dim, 16, 16]
        as `represent` returns it, or [B, r_dim, 1, 1] untiled (pool, pyramid); query_v [B, 7]."""
        c = self.config
        dtype = self.prior.weight.dtype
        check_representation(r, query_v, c.r_dim, GRID_SIZE, c.r_is_vector, dtype)
        check_noise(noise, c.L, query_v.shape[0], c.z_dim, GRID_SIZE, dtype)
        return self._generate(r, query_v, noise)

    def _generate(self, r, query_v, noise) -> torch.Tensor:
        r = r.expand(-1, -1, GRID_SIZE, GRID_SIZE)
        targets_v, _ = as_target_set(query_v)
        mean = self.render(self._latent(r, noise)[0], targets_v)
        return mean if query_v.dim() == 3 else mean[:, 0]
