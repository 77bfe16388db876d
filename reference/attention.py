"""The reference attention GQN: the plain PyTorch oracle of gqn_fast.attention.

Rosenbaum et al., 2018, "Learning models for visual 3D localization with implicit mapping":
GQN's generator and inference cores read, instead of one summed scene representation r, what
they attend to in a set of patch embeddings of the context views. Everything else is GQN's
(reference/gqn.py, GQN_SPEC.md): the DRAW-style ConvLSTM cores, the prior and posterior
Gaussians with their KL, the canvas, the Gaussian pixel likelihood.

What this file computes, for a scene with M context views (x^k, v^k):
1. Patches. Each 64x64 context image is cut into a G x G grid of P x P patches
   (P = attention_patch, G = 64 / P): N = M G^2 patches a scene.
2. Embedding. A small conv net reads each patch alone: conv k2 s2 (3 -> r_dim / 2), conv k2 s2
   (-> r_dim), conv k(P/4) s(P/4) (-> r_dim), ReLU after each: e_n, an r_dim vector.
3. Keys and values, once per scene: f_n = cat[e_n, v^k, p_n], with v^k the 7-d viewpoint of the
   patch's view and p_n its centre in the image, (row, column) in [-1, 1];
   key_n = W_k f_n (attention_key_dim), value_n = W_v f_n + b_v (r_dim). (A key bias would add
   the same q . b_k to all of a query's scores, which the softmax ignores: there is none.)
4. Reading, at each step l: a query per position of the 16x16 grid from the generator's state
   before the step, q = W_q h_g + b_q (attention_key_dim); the read is
   a = softmax(q K^T / sqrt(attention_key_dim)) V over the scene's N patches, an r_dim vector per
   position: an r_dim x 16 x 16 map that takes r's place in both cores' inputs at that step.
   (Where the paper is silent, chosen here: the query comes per position, so each part of the
   image being drawn can look at different patches; it comes from h_g, which generation has
   too, so training and generation read the same way, and both cores read the one read of the
   step; h_g = 0 at step 1, so the first read is the same at every position.)
All scenes of a batch have the same number M of context views (the training loop draws one M
per batch), so no mask is needed.

Parameter names (gqn_fast.AttentionGQN loads the same state_dict), with K cores as GQN's:
  patch_net.conv{1..3}.{weight,bias}
  key.weight  value.{weight,bias}  query.{weight,bias}
  inference_cores.{0..K-1}.*  generator_cores.{0..K-1}.*  prior.*  posterior.*  observation.*
as reference/gqn.py's; the cores' "r" input channels read the attention's read.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gqn_fast.reference.gqn import ELBO, GQN
from torch import nn

from gqn_fast.config import GRID_SIZE, IMAGE_SIZE, VIEWPOINT_DIM, GQNConfig

POSITION_DIM = 2  # a patch's centre: row and column


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V: query [B, Q, d], keys [B, N, d], values [B, N, d_v] -> [B, Q, d_v]."""
    scores = query @ keys.transpose(1, 2) / math.sqrt(query.shape[-1])
    return torch.softmax(scores, dim=-1) @ values


def patch_centres(grid: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[grid * grid, 2]: each patch's centre, (row, column) in [-1, 1], patches in row-major order."""
    centre = (torch.arange(grid, dtype=dtype, device=device) + 0.5) / grid * 2 - 1
    rows, columns = torch.meshgrid(centre, centre, indexing="ij")
    return torch.stack([rows.flatten(), columns.flatten()], dim=1)


def cut_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, 3, 64, 64] -> [N, G * G, 3, patch, patch], patches in row-major order."""
    n, channels, size, _ = x.shape
    grid = size // patch
    patches = x.reshape(n, channels, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, grid * grid, channels, patch, patch)


class PatchNet(nn.Module):
    """One P x P patch -> its r_dim embedding: [N, 3, P, P] -> [N, r_dim]."""

    def __init__(self, patch: int, r_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, r_dim // 2, kernel_size=2, stride=2)  # P/2
        self.conv2 = nn.Conv2d(r_dim // 2, r_dim, kernel_size=2, stride=2)  # P/4
        self.conv3 = nn.Conv2d(r_dim, r_dim, kernel_size=patch // 4, stride=patch // 4)  # 1

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(patch))
        h = F.relu(self.conv2(h))
        return F.relu(self.conv3(h)).flatten(1)


class PatchSet(NamedTuple):
    """A scene as attention GQN represents it: keys [B, N, attention_key_dim] and values
    [B, N, r_dim] of its N context patches."""

    keys: torch.Tensor
    values: torch.Tensor


class AttentionGQN(nn.Module):
    def __init__(self, config: GQNConfig | None = None):
        super().__init__()
        config = GQNConfig.preset("attention-small") if config is None else config
        if not isinstance(config, GQNConfig):
            raise TypeError(f"config: expected a GQNConfig, got {type(config).__name__}")
        if config.model != "attention":
            raise ValueError(f"config: expected model 'attention', got {config.model!r}")
        self.config = config
        c, v = config, VIEWPOINT_DIM
        self.patch_net = PatchNet(c.attention_patch, c.r_dim)
        features = c.r_dim + v + POSITION_DIM
        # No key bias: it adds the same q . b to every score of a query, which softmax ignores.
        self.key = nn.Linear(features, c.attention_key_dim, bias=False)
        self.value = nn.Linear(features, c.r_dim)
        self.query = nn.Linear(c.hidden, c.attention_key_dim)
        self._add_cores_and_heads()  # GQN's: the cores' "r" channels read the attention's read

    # GQN's cores, checks and steps (reference/gqn.py): its _elbo and _draw take each step's read.
    _add_cores_and_heads = GQN._add_cores_and_heads
    check_inputs = GQN.check_inputs
    _elbo = GQN._elbo
    _draw = GQN._draw
    _core = GQN._core
    _initial_state = GQN._initial_state
    _gaussian = GQN._gaussian

    def represent(self, context_x: torch.Tensor, context_v: torch.Tensor) -> PatchSet:
        """The keys and values of the scene's M * G^2 context patches (steps 1 to 3 above)."""
        B, M = context_x.shape[:2]
        patch = self.config.attention_patch
        patches = cut_patches(context_x.flatten(0, 1), patch)  # [B M, G^2, 3, P, P]
        per_view = patches.shape[1]
        embeddings = self.patch_net(patches.flatten(0, 1)).view(B, M, per_view, -1)
        cameras = context_v[:, :, None, :].expand(-1, -1, per_view, -1)
        centres = patch_centres(IMAGE_SIZE // patch, context_x.dtype, context_x.device)
        centres = centres.expand(B, M, -1, -1)
        features = torch.cat([embeddings, cameras, centres], dim=-1).flatten(1, 2)  # [B, N, features]
        return PatchSet(keys=self.key(features), values=self.value(features))

    def read(self, scene: PatchSet, h_g: torch.Tensor) -> torch.Tensor:
        """What each position of the generator's state attends to: [B, r_dim, 16, 16] (step 4)."""
        B = h_g.shape[0]
        query = self.query(h_g.flatten(2).transpose(1, 2))  # [B, 16 * 16, attention_key_dim]
        read = attend(query, scene.keys, scene.values)  # [B, 16 * 16, r_dim]
        return read.transpose(1, 2).reshape(B, -1, GRID_SIZE, GRID_SIZE)

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        """The negative evidence lower bound of query_x seen from query_v, as GQN's: the same steps,
        the cores reading at each one what its query attends to instead of one r."""
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        scene = self.represent(context_x, context_v)
        return self._elbo(lambda h_g: self.read(scene, h_g), query_x, query_v, sigma, noise)

    def forward(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        """Calling the model computes its ELBO (what DistributedDataParallel wraps)."""
        return self.elbo(context_x, context_v, query_x, query_v, sigma, noise)

    @torch.no_grad()
    def generate(self, context_x, context_v, query_v, noise=None) -> torch.Tensor:
        """The mean image [B, 3, 64, 64] of a scene seen from query_v, z drawn from the prior."""
        self.check_inputs(context_x, context_v, query_v, noise=noise)
        scene = self.represent(context_x, context_v)
        return self._draw(lambda h_g: self.read(scene, h_g), query_v, noise)
