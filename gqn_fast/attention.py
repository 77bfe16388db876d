"""gqn_fast.AttentionGQN: the reference attention GQN's parameters and function (reference/attention.py),
computed the fast way.

It subclasses the reference for its parameter names (one state_dict loads into both) and takes the
fast GQN's cells, ops and choices from gqn_fast.model.FastCores. What changes, all exact in real
arithmetic:
- The patch net runs on whole images: its convs have kernel = stride, so on the 64x64 image each
  output reads one patch alone, and the G x G output map is the patches' embeddings, with no
  copy of the patches cut out. Keys and values come from one product over the embeddings and
  the shares of the view's camera (once per view) and of the patch position (once per forward)
  added, never a concatenation of the three per patch. Once per scene, as in the reference.
- The read is torch's fused scaled_dot_product_attention (the attention matrix never stored for
  backward where a fused kernel runs), its output laid out as the cores' channels-last maps read it.
- What does not change across the steps is hoisted out of them, as in the fast GQN: x_q down's,
  v_q's (in closed form, gqn_fast.constant_conv) and the bias's share of each core's conv, once
  per core. At step 1 the states are zero, so the query is the query bias at every position and
  the read one vector per scene: the inference cell's whole input and the read's share of the
  generator's are then closed forms too, and the generator convolves z alone.
- The canvas never exists (gqn_fast.model.CanvasView, folding); the gate math, the posterior
  sample with its KL and the pixel NLL are the project's ops (lstm_gates, posterior_sample_kl,
  pixel_nll), where Triton runs, and their PyTorch forms on the CPU, as the fast GQN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gqn_fast.config import GRID_SIZE, IMAGE_SIZE
from gqn_fast.constant_conv import constant_conv
from gqn_fast.model import (
    X_Q,
    CanvasView,
    FastCores,
    GeneratorCell,
    InferenceCell,
    _standard_normal,
    group_of,
    in_order,
)
from gqn_fast.reference import attention as reference
from gqn_fast.reference.gqn import ELBO

# The runs each cell's weight is split into (gqn_fast.model.split_runs): the read r changes at
# every step, so it joins the step's run; x_q and v_q are hoisted.
VIEW = ("v_q",)
INFERENCE_STEP = ("r", "h_g", "u", "h_e")
GENERATOR_STEP = ("r", "z", "h_g")
INFERENCE_RUNS = (X_Q, VIEW, INFERENCE_STEP)
GENERATOR_RUNS = (VIEW, GENERATOR_STEP)


class AttentionGQN(FastCores, reference.AttentionGQN):
    """The fast attention GQN. Constructor, methods, outputs and parameter names as
    gqn_fast.reference.attention.AttentionGQN; the constructor's choices are FastCores'."""

    def represent(self, context_x, context_v) -> reference.PatchSet:
        B, M = context_x.shape[:2]
        x = context_x.flatten(0, 1)
        if self._pytorch_cpu(x):
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN: the net's convs faster
        net = self.patch_net
        h = F.relu(net.conv1(x), inplace=True)
        h = F.relu(net.conv2(h), inplace=True)
        h = F.relu(net.conv3(h), inplace=True)  # [B M, r_dim, G, G]: each patch's embedding
        embeddings = h.permute(0, 2, 3, 1).reshape(B, M, -1, h.shape[1])  # [B, M, G G, r_dim]
        # key and value as one map of cat[embedding, camera, centre], by its three column blocks
        weight = torch.cat([self.key.weight, self.value.weight])
        bias = F.pad(self.value.bias, (self.config.attention_key_dim, 0))  # the keys have none
        r_dim, v_dim = h.shape[1], context_v.shape[-1]
        w_e, w_v, w_p = weight.split([r_dim, v_dim, reference.POSITION_DIM], dim=1)
        grid = IMAGE_SIZE // self.config.attention_patch
        centres = reference.patch_centres(grid, x.dtype, x.device)
        per_view = F.linear(context_v, w_v, bias)[:, :, None, :]  # [B, M, 1, features]
        per_patch = F.linear(centres, w_p)  # [G G, features]
        both = (F.linear(embeddings, w_e) + per_view + per_patch).flatten(1, 2)  # [B, N, features]
        keys, values = both.split([self.config.attention_key_dim, r_dim], dim=-1)
        return reference.PatchSet(keys=keys, values=values)

    def _first_read(self, scene: reference.PatchSet) -> torch.Tensor:
        """The read of step 1, where h_g = 0 and every query is the query bias: [B, r_dim]."""
        B = scene.keys.shape[0]
        query = self.query.bias.view(1, 1, -1).expand(B, 1, -1)
        return F.scaled_dot_product_attention(query, scene.keys, scene.values)[:, 0]

    def _read(self, scene: reference.PatchSet, h_g: torch.Tensor) -> torch.Tensor:
        """The read of a later step: [B, r_dim, 16, 16], channels-last in memory."""
        B = h_g.shape[0]
        pixels = h_g.permute(0, 2, 3, 1).reshape(B, GRID_SIZE * GRID_SIZE, -1)  # a view if channels-last
        query = F.linear(pixels, self.query.weight, self.query.bias)
        read = F.scaled_dot_product_attention(query, scene.keys, scene.values)
        return read.view(B, GRID_SIZE, GRID_SIZE, -1).permute(0, 3, 1, 2)

    def _inference_cell(self, core: int, query_x, query_v) -> InferenceCell:
        module = self.inference_cores[core]
        pieces = self._split(module, INFERENCE_RUNS)
        conv = module.cell.conv
        x_down = module.downsample_x(self._core_layout(query_x))
        constant = F.conv2d(x_down, pieces[X_Q], conv.bias, padding=conv.padding)
        constant = constant.add_(constant_conv(query_v, pieces[VIEW], GRID_SIZE))
        return InferenceCell(step_weight=pieces[INFERENCE_STEP], constant=constant)

    def _generator_cell(self, core: int, query_v) -> GeneratorCell:
        module = self.generator_cores[core]
        pieces = self._split(module, GENERATOR_RUNS)
        # Not in place: the closed form's output is a view (see gqn_fast.model's _generator_cell).
        constant = constant_conv(query_v, pieces[VIEW], GRID_SIZE) + module.cell.conv.bias.view(-1, 1, 1)
        step_weight = pieces[GENERATOR_STEP]
        z_weight = group_of(step_weight, GENERATOR_STEP, module.layout, "z") if core == 0 else None
        return GeneratorCell(step_weight=step_weight, z_weight=z_weight, constant=constant)

    def _cores_of_step(self, step: int) -> int | None:
        """The index of the core whose cells step `step` makes (at its first step), else None."""
        if self.config.share_cores:
            return 0 if step == 0 else None
        return step

    def _inference_step(self, cell: InferenceCell, read, h_g, canvas: CanvasView, h_e, c_e):
        if h_g is None:  # h_e too, and the read is one vector: the whole input is a constant per scene
            zeros = read.new_zeros(read.shape[0], self.config.hidden)
            start = canvas.start.expand(read.shape[0], -1)
            vector = in_order(INFERENCE_STEP, r=read, h_g=zeros, u=start, h_e=zeros)
            return self._gates(cell.constant + constant_conv(vector, cell.step_weight, GRID_SIZE), c_e)
        x = in_order(INFERENCE_STEP, r=read, h_g=h_g, u=canvas.take(), h_e=h_e)
        return self._cell(x, cell.step_weight, cell.constant, c_e)

    def _generator_step(self, cell: GeneratorCell, read, z, h_g, c_g):
        if h_g is None:  # the read is one vector, its share a closed form; h_g is not convolved
            layout = self.generator_cores[0].layout
            r_weight = group_of(cell.step_weight, GENERATOR_STEP, layout, "r")
            return self._cell(z, cell.z_weight, cell.constant + constant_conv(read, r_weight, GRID_SIZE), c_g)
        return self._cell(in_order(GENERATOR_STEP, r=read, z=z, h_g=h_g), cell.step_weight, cell.constant, c_g)

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        B = query_x.shape[0]

        scene = self.represent(context_x, context_v)
        canvas = CanvasView(self)
        h_g = h_e = None  # zero states
        c_g, c_e = self._zeros(B, query_x), self._zeros(B, query_x)
        kls, states = [], []
        for step in range(self.config.L):
            core = self._cores_of_step(step)
            if core is not None:
                inference, generator = self._inference_cell(core, query_x, query_v), self._generator_cell(core, query_v)
            read = self._first_read(scene) if h_g is None else self._read(scene, h_g)
            mu_p, s_p = self._prior(h_g, B)
            h_e, c_e = self._inference_step(inference, read, h_g, canvas, h_e, c_e)
            mu_q, s_q = self.posterior(h_e).chunk(2, dim=1)
            eps = _standard_normal(mu_q, h_e.dtype) if noise is None else noise[step]
            z, kl = self._sample_kl(*(t.to(h_e.dtype) for t in (mu_q, s_q, mu_p, s_p, eps)))
            kls.append(kl)
            h_g, c_g = self._generator_step(generator, read, z, h_g, c_g)
            states.append(h_g)
            canvas.draw(h_g)

        return self._elbo_of(states, kls, query_x, sigma)

    @torch.no_grad()
    def generate(self, context_x, context_v, query_v, noise=None) -> torch.Tensor:
        self.check_inputs(context_x, context_v, query_v, noise=noise)
        B = query_v.shape[0]

        scene = self.represent(context_x, context_v)
        h_g, c_g = None, self._zeros(B, query_v)  # zero states
        states = []
        for step in range(self.config.L):
            core = self._cores_of_step(step)
            if core is not None:
                generator = self._generator_cell(core, query_v)
            read = self._first_read(scene) if h_g is None else self._read(scene, h_g)
            mu_p, s_p = self._prior(h_g, B)
            eps = _standard_normal(mu_p) if noise is None else noise[step]
            z = mu_p + F.softplus(s_p) * eps
            h_g, c_g = self._generator_step(generator, read, z, h_g, c_g)
            states.append(h_g)
        return torch.sigmoid(self._image_logits(states))
