"""gqn_fast.GQN: the reference GQN's parameters and function, computed the fast way.

Same constructor, methods and parameter names as gqn_fast.reference.GQN (it subclasses it
for exactly that: one state_dict loads into both); only `elbo` and `generate` differ. What
changes (GQN_SPEC.md, "Where the speed comes from"), all exact in real arithmetic:
- The query image, viewpoint and r do not change across the L steps, so their share of every
  core's 5x5 conv is computed once per forward, for all cores in one conv.
- The 128x64x64 canvas never exists: the inference core's view of it, conv(k4 s4) of a sum of
  convT(k4 s4) outputs, is a running sum of 1x1 maps on the 16x16 grid, and the output image
  is one transposed conv of the generator states straight to 3 channels (gqn_fast.folding).
- Each ConvLSTM cell's 5x5 conv over its step-varying inputs carries the gate math in its
  epilogue (kernels.conv_gates), so the [B, 4H, 16, 16] preactivations never make a round
  trip through memory; the posterior sample with its KL and the pixel NLL are fused kernels
  too, and recompute their activations in backward instead of storing them.

Precision: under bf16 autocast the convs run in bf16, while the ConvLSTM cell states, the
latent sample and its KL, and the image likelihood stay in the model's dtype (fp32): the cell
state is a running sum over L steps and the KL and NLL are sums over thousands of terms, where
bf16's 8-bit mantissa would cost more accuracy than its bandwidth saves on such small tensors.
The fused kernels compute in fp32 internally whatever they are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqn_fast.config import GRID_SIZE, VIEWPOINT_DIM
from gqn_fast.folding import downsample_after_upsample, observation_after_upsample
from gqn_fast.kernels import conv_gates, conv_lstm_gates, gaussian_nll, gaussian_sample_kl, use_triton
from gqn_fast.reference import gqn as reference
from gqn_fast.reference.representation import tile

ELBO = reference.ELBO


def _conv_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d would compute in here: autocast's, when it is on for the weight's device."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class CanvasView:
    """What each inference step reads of the canvas, conv_k4s4(u), kept on the 16x16 grid.

    Step l's inference core reads D_l(u_{l-1}) with u_{l-1} = sum_{j<l} T_j(h_j), which is
    a_l + sum_{j<l} (M_lj h_j + m_lj) (gqn_fast.folding). With shared cores M and m are one
    matrix and vector, so one running sum serves every step; with one core per step, each new
    h_j is mapped at once to its share of every later step's view.
    """

    def __init__(self, model: "GQN", batch: int):
        self.shared = model.config.share_cores
        self.down_w = torch.stack([core.downsample_u.weight for core in model.inference_cores])
        down_b = [core.downsample_u.bias for core in model.inference_cores]
        self.up_w = [core.upsample_h.weight for core in model.generator_cores]
        self.up_b = [core.upsample_h.bias for core in model.generator_cores]
        shape = (batch, model.config.canvas, GRID_SIZE, GRID_SIZE)
        # Before any drawing the canvas is zero and each view is its conv bias.
        self.views = [b[None, :, None, None].expand(shape) for b in down_b]
        if self.shared:
            self.shared_map = downsample_after_upsample(self.down_w[0], self.up_w[0], self.up_b[0])

    def before(self, step: int) -> torch.Tensor:
        return self.views[0 if self.shared else step]

    def draw(self, step: int, h: torch.Tensor) -> None:
        """Account for step `step`'s generator state h in the views of all later steps."""
        if self.shared:
            weight, bias = self.shared_map
            self.views[0] = self.views[0] + F.conv2d(h, weight[:, :, None, None], bias)
            return
        later = self.down_w[step + 1 :]
        if len(later) == 0:
            return
        weight, bias = downsample_after_upsample(later, self.up_w[step], self.up_b[step])
        shares = F.conv2d(h, weight.flatten(0, 1)[:, :, None, None], bias.flatten())
        for offset, share in enumerate(shares.chunk(len(later), dim=1)):
            self.views[step + 1 + offset] = self.views[step + 1 + offset] + share


class GQN(reference.GQN):
    """The fast GQN. Constructor, methods, outputs and parameter names as gqn_fast.reference.GQN.

    Two switches, plain attributes (not in the state_dict), for benchmarks and comparisons:
    fused_cells: None (default) fuses each cell's 5x5 conv with its gates (kernels.conv_gates)
        wherever the Triton kernels run (CUDA, or the CPU interpreter), and keeps the unfused
        conv + gate kernel elsewhere; True or False forces one or the other.
    backward_convs: "aten" (cuDNN) or "triton": the kernels of the fused cells' backward convs.
    """

    fused_cells: bool | None = None
    backward_convs: str = "aten"

    def _constant_preactivations(self, query_x, v_q, r):
        """Each core's preactivation share from the inputs that are the same at every step.

        Returns (inference, generator): lists with one [B, 4H, 16, 16] tensor per core
        (inference is None when query_x is None, as in generation), conv biases included.
        """
        V, R = VIEWPOINT_DIM, self.config.r_dim
        gen_w = [core.cell.conv.weight[:, : V + R] for core in self.generator_cores]
        gen_b = [core.cell.conv.bias for core in self.generator_cores]
        inputs = torch.cat([v_q, r], dim=1)
        n = len(self.generator_cores)
        if query_x is None:
            return None, F.conv2d(inputs, torch.cat(gen_w), torch.cat(gen_b), padding=2).chunk(n, 1)
        # Inference cell input channels: [x_q down (3), v_q, r, h_g, u down, h_e].
        inf_w = [core.cell.conv.weight[:, 3 : 3 + V + R] for core in self.inference_cores]
        inf_b = [core.cell.conv.bias for core in self.inference_cores]
        both = F.conv2d(inputs, torch.cat(inf_w + gen_w), torch.cat(inf_b + gen_b), padding=2)
        inference, generator = both.chunk(2, dim=1)
        # Each inference core down-samples the query image with its own conv: one conv for all,
        # then a grouped 5x5 conv applies each core's weights to its own 3 channels.
        cores = self.inference_cores
        x_down = F.conv2d(
            query_x,
            torch.cat([core.downsample_x.weight for core in cores]),
            torch.cat([core.downsample_x.bias for core in cores]),
            stride=4,
        )
        x_w = torch.cat([core.cell.conv.weight[:, :3] for core in cores])
        inference = inference + F.conv2d(x_down, x_w, padding=2, groups=n)
        return inference.chunk(n, 1), generator.chunk(n, 1)

    def _image_logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        """conv1x1(u_L) from the generator states, u_L = sum_l convT_l(h_l), never building u."""
        up = [(core.upsample_h.weight, core.upsample_h.bias) for core in self.generator_cores]
        if self.config.share_cores:
            (up_w, up_b), = up
            weight, bias = observation_after_upsample(self.observation.weight, up_w, up_b)
            h, bias = torch.stack(states).sum(0), len(states) * bias
        else:
            folded = [observation_after_upsample(self.observation.weight, w, b) for w, b in up]
            weight = torch.cat([w for w, _ in folded])
            bias = torch.stack([b for _, b in folded]).sum(0)
            h = torch.cat(states, dim=1)
        return F.conv_transpose2d(h, weight, bias + self.observation.bias, stride=4)

    # Step 1 starts from zero states, so the convs over h_g and h_e contribute nothing there and
    # are skipped; the prior is its bias and the canvas view the same for every scene.

    def _prior(self, step, h_g):
        if step == 0:
            bias = self.prior.bias[None, :, None, None].expand(h_g.shape[0], -1, *h_g.shape[2:])
            return bias.chunk(2, dim=1)
        return self.prior(h_g).chunk(2, dim=1)

    def _inference_step(self, step, h_g, view, h_e, c_e, constant):
        core = self.inference_cores[0 if self.config.share_cores else step]
        # Inference cell input channels: [x_q down, v_q, r, h_g, u down, h_e]; the first three
        # are in `constant`.
        H, C = self.config.hidden, self.config.canvas
        weight = core.cell.conv.weight[:, 3 + VIEWPOINT_DIM + self.config.r_dim :]
        if step == 0:
            return self._cell(view, weight[:, H : H + C], constant, c_e, batch_constant_input=True)
        return self._cell(torch.cat([h_g, view, h_e], dim=1), weight, constant, c_e)

    def _generator_step(self, step, z, h_g, c_g, constant):
        core = self.generator_cores[0 if self.config.share_cores else step]
        # Generator cell input channels: [v_q, r, z, h_g]; v_q and r are in `constant`.
        weight = core.cell.conv.weight[:, VIEWPOINT_DIM + self.config.r_dim :]
        if step == 0:
            return self._cell(z, weight[:, : self.config.z_dim], constant, c_g)
        return self._cell(torch.cat([z, h_g], dim=1), weight, constant, c_g)

    def _cell(self, x, weight, constant, c, batch_constant_input=False):
        """(h, c') of a ConvLSTM cell from its step-varying input x and the hoisted `constant`.

        Fused (the 5x5 conv with the gates in its epilogue) where the kernels run; unfused
        (cuDNN or the CPU's conv, then the gate kernel) elsewhere or when asked. An input that
        is the same for every scene (the canvas view before any drawing) is convolved once
        on the unfused path.
        """
        fused = use_triton(c) if self.fused_cells is None else self.fused_cells
        if fused:
            dtype = _conv_dtype(weight)
            return conv_gates(x.to(dtype), weight.to(dtype), constant, c, backward_convs=self.backward_convs)
        if batch_constant_input:
            x = x[:1]
        preact = F.conv2d(x, weight, padding=2) + constant
        return conv_lstm_gates(preact.to(c.dtype), c)

    def _zeros(self, batch, like):
        return like.new_zeros(batch, self.config.hidden, GRID_SIZE, GRID_SIZE)

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        c = self.config
        B = query_x.shape[0]

        r = self.represent(context_x, context_v)
        inference_const, generator_const = self._constant_preactivations(
            query_x, tile(query_v, GRID_SIZE), r
        )
        canvas = CanvasView(self, B)
        h_g, c_g, h_e, c_e = (self._zeros(B, query_x) for _ in range(4))
        kls, states = [], []
        for step in range(c.L):
            core = 0 if c.share_cores else step
            mu_p, s_p = self._prior(step, h_g)
            h_e, c_e = self._inference_step(step, h_g, canvas.before(step), h_e, c_e, inference_const[core])
            mu_q, s_q = self.posterior(h_e).chunk(2, dim=1)
            eps = torch.randn_like(h_e[:, : c.z_dim]) if noise is None else noise[step]
            z, kl = gaussian_sample_kl(*(t.to(h_e.dtype) for t in (mu_q, s_q, mu_p, s_p, eps)))
            kls.append(kl)
            h_g, c_g = self._generator_step(step, z, h_g, c_g, generator_const[core])
            states.append(h_g)
            if step < c.L - 1:
                canvas.draw(step, h_g)

        logits = self._image_logits(states)
        nll = gaussian_nll(query_x, logits.to(query_x.dtype), float(sigma))
        kl = torch.stack(kls, dim=1)
        loss = (nll + kl.sum(dim=1)).mean()
        return ELBO(loss=loss, nll=nll, kl=kl, mean=torch.sigmoid(logits))

    @torch.no_grad()
    def generate(self, context_x, context_v, query_v, noise=None) -> torch.Tensor:
        self.check_inputs(context_x, context_v, query_v, noise=noise)
        c = self.config
        B = query_v.shape[0]

        r = self.represent(context_x, context_v)
        _, generator_const = self._constant_preactivations(None, tile(query_v, GRID_SIZE), r)
        h_g, c_g = self._zeros(B, context_x), self._zeros(B, context_x)
        states = []
        for step in range(c.L):
            mu_p, s_p = self._prior(step, h_g)
            eps = torch.randn_like(mu_p) if noise is None else noise[step]
            z = mu_p + F.softplus(s_p) * eps
            core = 0 if c.share_cores else step
            h_g, c_g = self._generator_step(step, z, h_g, c_g, generator_const[core])
            states.append(h_g)
        return torch.sigmoid(self._image_logits(states))
