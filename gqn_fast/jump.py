"""gqn_fast.jump.JUMP: the reference Consistent GQN's parameters and function, computed the fast way.

Same constructor, methods and parameter names as gqn_fast.reference.jump.JUMP (it subclasses it:
one state_dict loads into both). What changes, all exact in real arithmetic (the fast GQN's
algebra, gqn_fast/model.py, applied to JUMP's three cores):
- What a core reads unchanged over its L steps is convolved once per core (once in all with
  shared cores), from a split of its weight made once per forward (model.split_runs): the
  latent core's r, the inference core's r' (in closed form for the pool and pyramid nets, whose
  r is a tiled vector: constant_conv), the renderer's z, once per scene and not once per target,
  and its viewpoint, a tiled vector, in closed form. Each step convolves only the states.
- Zero states are skipped: the latent core's first step reads z_0 = 0 and h_g = 0, and the
  renderer's first step h_d = 0, so their preactivations are the hoisted constant alone; the
  inference core's first step convolves h_g alone.
- The 64x64 canvas never exists: the image is one transposed conv of the renderer's states
  straight to 3 channels (model.image_logits, gqn_fast.folding).
- The representation nets run the fast way (gqn_fast.representation, channels-last images on
  the CPU).
- The gate math is kernels.lstm_gates, the posterior sample with its KL kernels.posterior_sample_kl,
  the pixel likelihood kernels.pixel_nll; each op takes the model's custom_ops choice and decides
  its own path (kernels/utils.py: use_custom_op).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from gqn_fast.config import GRID_SIZE
from gqn_fast.constant_conv import constant_conv
from gqn_fast.kernels import lstm_gates, pixel_nll, posterior_sample_kl
from gqn_fast.kernels.utils import CUSTOM_OP_CHOICES
from gqn_fast.model import (
    CPU_CORE_LAYOUTS,
    FastPaths,
    _standard_normal,
    group_of,
    image_logits,
    split_runs,
)
from gqn_fast.reference import jump as reference
from gqn_fast.reference.jump import as_target_set

ELBO = reference.ELBO

# Each core's weight split into the run it reads unchanged over the steps and the run of its
# step inputs (names from the layouts of reference/jump.py).
LATENT_RUNS = (("r",), ("z", "h_g"))
INFERENCE_RUNS = (("r",), ("h_g", "h_e"))
RENDERER_RUNS = (("v_q",), ("z",), ("h_d",))


class Cell(NamedTuple):
    """A core as each of its steps reads it, made once per core and forward."""

    step_weight: torch.Tensor  # the weight's piece over the inputs each step changes
    first_weight: torch.Tensor | None  # its part over what the first step reads (None: nothing)
    constant: torch.Tensor  # the hoisted share of the unchanged inputs, with the bias: [N, 4H, 16, 16]


def scene_share(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(r, weight, padding=K // 2) for the tower's map r, or for the pool and pyramid nets'
    vector r [B, C, 1, 1] tiled over the grid, in closed form (constant_conv)."""
    if r.shape[-1] == 1:
        return constant_conv(r.flatten(1), weight, GRID_SIZE)
    return F.conv2d(r, weight, padding=weight.shape[-1] // 2)


class JUMP(FastPaths, reference.JUMP):
    """The fast Consistent GQN. Constructor, methods, outputs and parameter names as the reference's.

    Choices, keyword arguments of the constructor (not in the state_dict), as gqn_fast.GQN's:
    custom_ops: "auto": the gate and posterior ops where the Triton kernels run, their PyTorch form
        through autograd elsewhere; "always": the ops everywhere (on the CPU their own PyTorch path).
    cpu_core_layout: the cores' activations on the CPU's PyTorch path: "auto" (channels-last for
        cells of at most model.CHANNELS_LAST_MAX_GATES gate channels), "channels_last" or "contiguous".
    """

    def __init__(self, config=None, *, custom_ops: str = "auto", cpu_core_layout: str = "auto"):
        super().__init__(config)
        for name, value, allowed in (
            ("custom_ops", custom_ops, CUSTOM_OP_CHOICES),
            ("cpu_core_layout", cpu_core_layout, CPU_CORE_LAYOUTS),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        self.custom_ops, self.cpu_core_layout = custom_ops, cpu_core_layout

    def represent(self, context_x, context_v) -> torch.Tensor:
        return self._representation(context_x, context_v).expand(-1, -1, GRID_SIZE, GRID_SIZE)

    def _cell(self, core, runs, constant_share, first: str | None) -> Cell:
        """core's Cell: its weight split by runs (the first run the unchanged inputs, the last the
        step's), `constant_share(pieces)` plus the bias as the constant."""
        conv = core.cell.conv
        channels_last = self._cores_channels_last(conv.weight)
        # Channels-last pieces' gradients come back channels-last: written straight into a contiguous one.
        pieces = split_runs(conv.weight, core.layout, runs, contiguous_grad=channels_last)
        step_weight = pieces[runs[-1]]
        if self.config.share_cores and channels_last:  # read L times: one copy saves oneDNN a reorder a call
            step_weight = step_weight.contiguous(memory_format=torch.channels_last)
        first_weight = None if first is None else group_of(step_weight, runs[-1], core.layout, first)
        # Not in place: a closed form's output may be a view.
        return Cell(step_weight, first_weight, self._core_layout(constant_share(pieces) + conv.bias.view(-1, 1, 1)))

    def _cells(self, cores, make) -> list[Cell]:
        """Each step's Cell: one per core, made once per forward."""
        if self.config.share_cores:
            return [make(cores[0])] * self.config.L
        return [make(core) for core in cores]

    def _step(self, cell: Cell, x, c, first: bool):
        """(h, c') of one step: the step inputs x convolved (on the first step, x is what the first
        weight reads, or None for nothing), then the gates with the hoisted constant."""
        if x is None:  # the preactivation is the constant alone (not added to in place: it is reused)
            return lstm_gates(cell.constant, c, custom_op=self.custom_ops)
        weight = cell.first_weight if first else cell.step_weight
        preact = F.conv2d(self._core_layout(x), weight, padding=weight.shape[-1] // 2)
        if self.config.share_cores:  # the constant lives through the L steps anyway: the gates read it
            return lstm_gates(preact, c, cell.constant, custom_op=self.custom_ops)
        # Read by this step alone: added in place, so that the gate op saves no copy of it.
        return lstm_gates(preact.add_(cell.constant), c, custom_op=self.custom_ops)

    def _latent(self, r, noise, r_posterior=None):
        c = self.config
        r = r[:, :, :1, :1] if c.r_is_vector else r  # a tiled vector: the closed forms read it once
        B = r.shape[0]
        latent = self._cells(
            self.latent_cores, lambda core: self._cell(core, LATENT_RUNS, lambda p: scene_share(r, p[("r",)]), None)
        )
        if r_posterior is not None:
            r_posterior = r_posterior[:, :, :1, :1] if c.r_is_vector else r_posterior
            inference = self._cells(
                self.inference_cores,
                lambda core: self._cell(core, INFERENCE_RUNS, lambda p: scene_share(r_posterior, p[("r",)]), "h_g"),
            )
        c_g = c_e = self._core_layout(r.new_zeros(B, c.hidden, GRID_SIZE, GRID_SIZE))
        h_g = h_e = z = None  # zero states and z_0 = 0
        zs, kls = [], []
        for step in range(c.L):
            x = None if z is None else torch.cat([z, h_g], dim=1)
            h_g, c_g = self._step(latent[step], x, c_g, first=False)
            mu_p, s_p = self.prior(h_g).chunk(2, dim=1)
            if r_posterior is None:
                eps = _standard_normal(mu_p) if noise is None else noise[step]
                z = mu_p + F.softplus(s_p) * eps
            else:
                x = h_g if h_e is None else torch.cat([h_g, h_e], dim=1)
                h_e, c_e = self._step(inference[step], x, c_e, first=h_e is None)
                mu_q, s_q = self.posterior(h_e).chunk(2, dim=1)
                # In the state's dtype: under autocast the heads' outputs are bf16, and bf16 draws coarse.
                eps = _standard_normal(mu_q, h_e.dtype) if noise is None else noise[step]
                gaussians = (t.to(h_e.dtype) for t in (mu_q, s_q, mu_p, s_p, eps))
                z, kl = posterior_sample_kl(*gaussians, custom_op=self.custom_ops)
                kls.append(kl)
            zs.append(z)
        return torch.cat(zs, dim=1), torch.stack(kls, dim=1) if kls else None

    def _render_logits(self, z, query_v) -> torch.Tensor:
        """The image logits [B K, 3, 64, 64] of the K viewpoints query_v [B, K, 7] from each scene's z."""
        c = self.config
        B, K = query_v.shape[:2]
        v = query_v.flatten(0, 1)

        def share(pieces):  # z's once per scene, the viewpoint's in closed form per target
            z_share = scene_share(z, pieces[("z",)])
            v_share = constant_conv(v, pieces[("v_q",)], GRID_SIZE).view(B, K, *z_share.shape[1:])
            return (z_share[:, None] + v_share).flatten(0, 1)

        cells = self._cells(self.renderer_cores, lambda core: self._cell(core, RENDERER_RUNS, share, None))
        h, c_d = None, self._core_layout(z.new_zeros(B * K, c.hidden, GRID_SIZE, GRID_SIZE))
        states = []
        for step in range(c.L):
            h, c_d = self._step(cells[step], h, c_d, first=False)
            states.append(h)
        return image_logits(states, [core.upsample_h for core in self.renderer_cores], self.observation, c.share_cores)

    def render(self, z, query_v) -> torch.Tensor:
        B, K = query_v.shape[:2]
        mean = torch.sigmoid(self._render_logits(z, query_v))
        return mean.view(B, K, *mean.shape[1:])

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        targets_v, targets_x = as_target_set(query_v, query_x)
        B, K = targets_v.shape[:2]
        r = self._representation(context_x, context_v)
        r_posterior = r + self._representation(targets_x, targets_v)
        z, kl = self._latent(r, noise, r_posterior)
        logits = self._render_logits(z, targets_v)
        # A scene's targets as the channels of one sample: the NLL's per-sample sum is the scene's.
        nll = pixel_nll(
            targets_x.flatten(1, 2),
            logits.view(B, K * 3, *logits.shape[2:]).to(targets_x.dtype),
            sigma,
            custom_op=self.custom_ops,
        )
        loss = (nll + kl.sum(dim=1)).mean()
        return ELBO(loss=loss, nll=nll, kl=kl, mean=torch.sigmoid(logits).view_as(query_x))
