"""gqn_fast.GQN: the reference GQN's parameters and function, computed the fast way.

Same constructor, methods and parameter names as gqn_fast.reference.GQN (it subclasses it
for exactly that: one state_dict loads into both); `represent`, `elbo`, `generate` and
`generate_from` compute the same function differently. What changes (docs/spec.md, "Where the
speed comes from"), all exact in real arithmetic:
- Each cell's weight is split once per forward into runs of its input groups (the layouts of
  reference/cores.py): a split's backward is one concatenation, where per-step slices would
  each zero-fill a weight-sized gradient. Nothing weight-sized is allocated per step.
- The query image, viewpoint and r do not change across the L steps, so their share of a
  core's 5x5 conv is computed once per core (once in all with shared cores). With the pool and
  pyramid nets [v_q, r] is one vector per scene, tiled, and with the tower v_q is: their share
  is exact in closed form, with no convolution (gqn_fast.constant_conv); so is the first
  step's, where the states are zero and the canvas view is its bias everywhere. The first
  generator step, whose h_g is zero, convolves z alone.
- Few ops per step: an eager step's host time (dispatch, autograd nodes) is what a GPU waits on
  at small sizes, so the algebra is written with matrix products over views, constants made
  once (bench/op_count.py counts them; a test holds the fast step to fewer ops than the
  reference's).
- The representation nets read v the same way (gqn_fast.representation).
- The 128x64x64 canvas never exists: the inference core's view of it, conv(k4 s4) of a sum of
  convT(k4 s4) outputs, is a running sum of 1x1 maps on the 16x16 grid, and the output image
  is one transposed conv of the generator states straight to 3 channels (gqn_fast.folding).
- Where the Triton kernels run, each ConvLSTM cell's gate math is one kernel after cuDNN's conv
  (or, with fused_cells, in the epilogue of the conv itself: kernels.conv_lstm_cell); the
  posterior sample with its KL and the pixel NLL are fused kernels too, and recompute their
  activations in backward instead of storing them. On the CPU's PyTorch path the cells are a
  conv, then the gate math through autograd; the representation nets read channels-last
  images, and the cores run channels-last where oneDNN is faster on it
  (CHANNELS_LAST_MAX_GATES).

Precision: under bf16 autocast the convs run in bf16, while the ConvLSTM cell states, the
latent sample and its KL, and the image likelihood stay in the model's dtype (fp32): the cell
state is a running sum over L steps and the KL and NLL are sums over thousands of terms, where
bf16's 8-bit mantissa would cost more accuracy than its bandwidth saves on such small tensors.
The fused kernels compute in fp32 internally whatever they are given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gqn_fast.config import GRID_SIZE
from gqn_fast.constant_conv import constant_conv
from gqn_fast.folding import (
    downsample_after_upsample,
    observation_after_upsample,
)
from gqn_fast.kernels import conv_lstm_cell, lstm_gates, pixel_nll, posterior_sample_kl, use_triton
from gqn_fast.kernels.utils import CUSTOM_OP_CHOICES
from gqn_fast.reference import gqn as reference
from gqn_fast.reference.representation import tile
from gqn_fast.representation import represent

ELBO = reference.ELBO


# On the CPU's PyTorch path oneDNN runs the cores' convs faster on channels-last activations for
# cells of at most this many gate channels (4H), and faster on NCHW ones for wider cells, where
# the weight dominates (the small preset's 128 against the paper's 512).
CHANNELS_LAST_MAX_GATES = 256
CPU_CORE_LAYOUTS = ("auto", "channels_last", "contiguous")


def _conv_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype F.conv2d would compute in here: autocast's, when it is on for the weight's device."""
    device = weight.device.type
    # Meta tensors (shape-only runs: bench/op_count.py) have no autocast to ask.
    if not weight.is_meta and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


# How each cell's weight is split: into runs of adjacent input groups (names from the layouts in
# reference/cores.py), each run a tuple of names, its piece of the weight looked up by it. What is
# constant across steps (x_q, and the scene's v_q and r: scene_runs) is hoisted out of the steps;
# one conv per step reads the rest, the step run.
X_Q = ("x_q",)
INFERENCE_STEP = ("h_g", "u", "h_e")
GENERATOR_STEP = ("z", "h_g")


def scene_runs(r_is_vector: bool) -> tuple[tuple[str, ...], ...]:
    """v_q is a tiled vector, its share of a conv a closed form; so is r with the pool and pyramid
    nets (r_is_vector), and then the two are one run, one closed form (SceneInput)."""
    return (("v_q", "r"),) if r_is_vector else (("v_q",), ("r",))


def inference_runs(r_is_vector: bool) -> tuple[tuple[str, ...], ...]:
    return (X_Q, *scene_runs(r_is_vector), INFERENCE_STEP)


def generator_runs(r_is_vector: bool) -> tuple[tuple[str, ...], ...]:
    return (*scene_runs(r_is_vector), GENERATOR_STEP)


Pieces = dict[tuple[str, ...], torch.Tensor]  # a cell weight's pieces, by run


class _SplitContiguousGrad(torch.autograd.Function):
    """weight.split(sizes, dim=1), whose backward concatenates the pieces' gradients straight
    into a contiguous tensor. Autograd's split backward concatenates in the pieces' layout when
    they agree, and with channels-last cores on the CPU oneDNN returns every piece's gradient
    channels-last: the parameter's gradient would then be copied once more, whole, into the
    parameter's layout. (Elsewhere the pieces' gradients are contiguous, and the built-in split,
    without this Python in its backward, is the cheaper call.)"""

    @staticmethod
    def forward(ctx, weight, sizes):
        ctx.shape, ctx.dtype, ctx.device = weight.shape, weight.dtype, weight.device
        return weight.split(sizes, dim=1)

    @staticmethod
    def backward(ctx, *grads):  # an unused piece's gradient comes as zeros (materialized)
        out = torch.empty(ctx.shape, dtype=ctx.dtype, device=ctx.device)  # contiguous, as parameters are
        return torch.cat(grads, dim=1, out=out), None


def split_runs(weight: torch.Tensor, layout: dict[str, int], runs, contiguous_grad: bool = False) -> Pieces:
    """The cell weight [4H, sum(layout), K, K] cut into one piece per run of input groups, by one
    split (its backward is a single concatenation of the pieces' gradients, written contiguous
    when contiguous_grad: _SplitContiguousGrad)."""
    names = [name for run in runs for name in run]
    if names != list(layout):
        raise ValueError(f"runs: expected the groups {list(layout)} in order, got {names}")
    sizes = [sum(layout[name] for name in run) for run in runs]
    pieces = _SplitContiguousGrad.apply(weight, sizes) if contiguous_grad else weight.split(sizes, dim=1)
    return dict(zip(runs, pieces))


def group_of(piece: torch.Tensor, run: tuple[str, ...], layout: dict[str, int], name: str) -> torch.Tensor:
    """The part of a run's weight piece over one of its groups (a view)."""
    start = sum(layout[group] for group in run[: run.index(name)])
    return piece[:, start : start + layout[name]]


def in_order(run: Iterable[str], dim: int = 1, **inputs: torch.Tensor) -> torch.Tensor:
    """The inputs of a run (or of a whole layout), named, concatenated in its order (its weight's
    channel order)."""
    return torch.cat([inputs[name] for name in run], dim=dim)


def _standard_normal(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard-normal draws of like's shape and device (and dtype, unless given), contiguous
    (the reference's layout and order): randn_like of a channel slice of a channels-last map
    fills that map's layout, 8x slower on the CPU."""
    return torch.randn(like.shape, dtype=dtype or like.dtype, device=like.device)


def _sum_views(r_k: torch.Tensor, B: int, M: int) -> torch.Tensor:
    """r = the sum over each scene's M views of r_k [B M, C, Y, X], in r_k's memory layout: its
    gradient then comes back in that layout too, where the representation net's last ReLU
    backward reads it beside its channels-last output (mixed layouts made that op 10x slower)."""
    if r_k.is_contiguous(memory_format=torch.channels_last) and not r_k.is_contiguous():
        pixels = r_k.permute(0, 2, 3, 1)  # [B M, Y, X, C], contiguous
        return pixels.reshape(B, M, *pixels.shape[1:]).sum(dim=1).permute(0, 3, 1, 2)
    return r_k.view(B, M, *r_k.shape[1:]).sum(dim=1)


# The canvas maps (gqn_fast.folding) as matmuls over the pixels of a channels-last state: there
# PyTorch's CPU 1x1 and stride-4 transposed convs take a slow path that returns the state's
# gradient NCHW, and every gate backward and conv backward that gradient reached would run on
# mixed layouts or copy it. Other layouts: the convs.


def conv1x1(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(h, weight[:, :, None, None], bias) for weight [C_out, C_in]."""
    if not h.is_contiguous(memory_format=torch.channels_last):
        return F.conv2d(h, weight.view(*weight.shape, 1, 1), bias)
    return F.linear(h.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)


def patch_transposed_conv(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.conv_transpose2d(h, weight, bias, stride=k) for weight [C_in, C_out, k, k]: each pixel of h
    paints its own k x k patch."""
    k = weight.shape[-1]
    if not h.is_contiguous(memory_format=torch.channels_last):
        return F.conv_transpose2d(h, weight, bias, stride=k)
    B, C, Y, X = h.shape
    patches = h.permute(0, 2, 3, 1).reshape(B * Y * X, C) @ weight.reshape(C, -1)
    image = patches.view(B, Y, X, -1, k, k).permute(0, 3, 1, 4, 2, 5).reshape(B, -1, k * Y, k * X)
    return image + bias.view(1, -1, 1, 1)


def image_logits(states: list[torch.Tensor], upsamples, observation, shared: bool) -> torch.Tensor:
    """observation(u_L), u_L = sum_l upsamples_l(h_l) (a canvas the states draw on, one convT k4 s4
    per core: one for all states when `shared`), from the states alone: u is never built."""
    up = [(conv.weight, conv.bias) for conv in upsamples]
    if shared:
        ((up_w, up_b),) = up
        weight, bias = observation_after_upsample(observation.weight, up_w, up_b)
        h = states[0]
        for state in states[1:]:  # adds keep the states' layout (a stack's sum does not)
            h = h + state
        bias = len(states) * bias
    else:
        folded = [observation_after_upsample(observation.weight, w, b) for w, b in up]
        weight = torch.cat([w for w, _ in folded])
        bias = torch.stack([b for _, b in folded]).sum(0)
        h = torch.cat(states, dim=1)
    return patch_transposed_conv(h, weight, bias + observation.bias)


class SceneInput:
    """What every core reads unchanged at every step: v_q and r, in the runs of scene_runs.

    v_q is one vector per scene, tiled. With the pool and pyramid nets so is r (r_is_vector, r
    [B, r_dim, 1, 1]): [v_q, r] is then one vector, and its share of a conv one closed form
    (gqn_fast.constant_conv), one run of the weight. The tower's r is a 16x16 map, read by every
    core's conv (saved once for their backward), and v_q's share its own closed form: cheaper
    than tiling v_q beside r, as the reference does, which gives that conv 7 more input channels.
    """

    def __init__(self, query_v: torch.Tensor, r: torch.Tensor, r_is_vector: bool):
        if r_is_vector:
            self.vector, self.r_map = torch.cat([query_v, r.flatten(1)], dim=1), None
        else:
            self.vector, self.r_map = query_v, r

    def share(self, pieces: Pieces) -> torch.Tensor:
        """conv2d(cat[v_q tiled, r tiled or not], cat[their weights], padding=K // 2): [B, 4H, 16, 16],
        from a cell weight's pieces (split_runs over scene_runs and others)."""
        if self.r_map is None:
            return constant_conv(self.vector, pieces[("v_q", "r")], GRID_SIZE)
        r_weight = pieces[("r",)]
        # In place: sums into a fresh output whose op's backward does not read it.
        return F.conv2d(self.r_map, r_weight, padding=r_weight.shape[-1] // 2).add_(
            constant_conv(self.vector, pieces[("v_q",)], GRID_SIZE)
        )


class CorePieces(NamedTuple):
    """One core index's cell weights in pieces (inference_runs, generator_runs), split once per
    forward; no inference pieces in generate."""

    inference: Pieces | None
    generator: Pieces


class InferenceCell(NamedTuple):
    """An inference core as each of its steps reads it, made once per core and forward."""

    step_weight: torch.Tensor  # the weight's piece over INFERENCE_STEP, the inputs each step changes
    constant: torch.Tensor  # the hoisted share of x_q down, v_q, r and the bias, [B, 4H, 16, 16]


class GeneratorCell(NamedTuple):
    """A generator core as each of its steps reads it, made once per core and forward."""

    step_weight: torch.Tensor  # the weight's piece over GENERATOR_STEP
    # Its part over z alone, for the step from the zero state h_g = 0 (h_g is not convolved):
    # the first core's first step. None for the other cores.
    z_weight: torch.Tensor | None
    constant: torch.Tensor  # the hoisted share of v_q, r and the bias


class StepCells(NamedTuple):
    inference: InferenceCell | None  # None in generate
    generator: GeneratorCell


class CanvasView:
    """What each inference step reads of the canvas, conv_k4s4(u), kept on the 16x16 grid.

    Step l's inference core reads D_l(u_{l-1}) with u_{l-1} = sum_{j<l} T_j(h_j), which is
    a_l + sum_{j<l} (M_lj h_j + m_lj) (gqn_fast.folding). With shared cores M and m are one
    matrix and vector, so one running sum serves every step. With one core per step, each new
    h_j is mapped at once to its share of every later step's view, by the M_lj (l > j) made
    then, one small product each: so their backward runs step by step, and no [L C', L H]
    matrix of all pairs (half of it never read) has its gradient alive beside every weight
    gradient at the end of the backward, where the training peak is.
    The shares of the steps still to come are one tensor, the next step's first: each step adds
    its own shares to it in one op and the next step splits its view off (L - 1 adds a forward,
    where one add per pair of steps would be L (L - 1) / 2). Before any drawing the view is a_l.
    The view keeps count of the states drawn: the next step's index.
    """

    def __init__(self, model: GQN):
        self.shared = model.config.share_cores
        self.steps, self.drawn = model.config.L, 0
        down = [core.downsample_u for core in model.inference_cores]
        up = [core.upsample_h for core in model.generator_cores]
        self.start = down[0].bias  # step 1's view, the same at every position of every scene
        if self.shared:
            self.map = downsample_after_upsample(down[0].weight, up[0].weight, up[0].bias)
            self.view = down[0].bias.view(1, -1, 1, 1)
            return
        self.canvas = down[0].bias.shape[0]
        # M_lj = D_l . T_j (folding.downsample_after_upsample) from views of the weights made
        # once per forward: [C', C 16] rows for every D_l, [C 16, H] columns for every T_j.
        self.down_rows = [d.weight.flatten(1) for d in down]
        self.up_columns = [u.weight.flatten(1).t() for u in up]
        # a_l + sum_{j<l} m_lj = a_l + (D_l summed over its taps) . (sum_{j<l} t_j), per view
        drawn_bias = torch.stack([u.bias for u in up[:-1]]).cumsum(0) if len(up) > 1 else []
        self.biases = [None] + [
            (d.weight.sum(dim=(2, 3)) @ b + d.bias).view(1, -1, 1, 1) for d, b in zip(down[1:], drawn_bias)
        ]
        self.pending = None  # [B, C' x steps to come, 16, 16]: their shares of the states drawn so far

    def take(self) -> torch.Tensor:
        """The next step's view, broadcastable to [B, C, 16, 16], once a state has been drawn
        (before, the view is `start`); with one core per step, read once (it is split off the
        shares still pending)."""
        if self.shared:
            return self.view
        view, self.pending = self.pending.split([self.canvas, self.pending.shape[1] - self.canvas], dim=1)
        return view + self.biases[self.drawn]

    def draw(self, h: torch.Tensor) -> None:
        """Account for the next generator state h in the views of all later steps."""
        step, self.drawn = self.drawn, self.drawn + 1
        if self.drawn == self.steps:  # the last state: no later step reads the canvas
            return
        if self.shared:
            weight, bias = self.map
            self.view = self.view + conv1x1(h, weight, bias)
            return
        weight = torch.cat([rows @ self.up_columns[step] for rows in self.down_rows[step + 1 :]])
        shares = conv1x1(h, weight)
        self.pending = shares if self.pending is None else self.pending + shares


class FastPaths:
    """What the fast models of the GQN family share (gqn_fast.GQN, gqn_fast.jump.JUMP,
    gqn_fast.attention.AttentionGQN): where their convs run and in which layout, and their
    representation net's call. For a model with `config`, `representation` and the choices
    `custom_ops` and `cpu_core_layout` (FastCores documents them)."""

    @staticmethod
    def _pytorch_cpu(t: torch.Tensor) -> bool:
        """True on the CPU's PyTorch path, where oneDNN runs the convs: the model picks their
        layouts for it. (Under the interpreter the kernels run and the model keeps the GPU's.)"""
        return t.device.type == "cpu" and not use_triton(t)

    def _cores_channels_last(self, t: torch.Tensor) -> bool:
        if not self._pytorch_cpu(t):
            return False
        if self.cpu_core_layout == "auto":
            return 4 * self.config.hidden <= CHANNELS_LAST_MAX_GATES
        return self.cpu_core_layout == "channels_last"

    def _core_layout(self, t: torch.Tensor) -> torch.Tensor:
        """An input of the cores' convs in the layout they read fastest (cpu_core_layout): oneDNN
        converts any other on every call. Unchanged where the Triton kernels run."""
        if not self._pytorch_cpu(t):
            return t
        if self._cores_channels_last(t):
            return t.contiguous(memory_format=torch.channels_last)
        return t.contiguous()

    def _representation(self, context_x, context_v) -> torch.Tensor:
        """r as the representation net gives it (1x1 with pool and pyramid, untiled)."""
        B, M = context_x.shape[:2]
        x = context_x.flatten(0, 1)
        if self._pytorch_cpu(x):
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN: the nets' convs up to 2x faster
        r_k = represent(self.representation, x, context_v.flatten(0, 1))
        return self._core_layout(_sum_views(r_k, B, M))


class FastCores(FastPaths):
    """What the fast models with GQN's generator and inference cores (this GQN,
    gqn_fast.attention) compute alike: their ConvLSTM cells from a hoisted constant and a step
    input, the cores' weight splits, the zero-state prior and the output image from the generator
    states. A mixin: the model class lists it before its reference class, whose constructor it calls.

    Choices, keyword arguments of the constructor (not in the state_dict; fixed for the model's
    life, so torch.compile's graph of it is right), for benchmarks and comparisons:
    fused_cells: False (default): each cell's 5x5 conv by cuDNN (oneDNN on the CPU), then the
        gate kernel. True: the conv with the gates in its epilogue (kernels.conv_lstm_cell; its
        PyTorch path where Triton does not run). Not the default: on an H100 it is slower than
        cuDNN plus the gate kernel (docs/performance.md); it becomes the default if a GPU
        measures it faster (gates_in_one_dot is the candidate).
    backward_convs: "aten" (cuDNN) or "triton": the kernels of the fused cells' backward convs.
    gates_in_one_dot: the fused cells' forward GEMM as one product over the four gates.
    cpu_core_layout: the cores' activations on the CPU's PyTorch path: "auto" (by the cells'
        width, CHANNELS_LAST_MAX_GATES), "channels_last" or "contiguous".
    custom_ops: how the gate, posterior and pixel likelihood ops run, passed to each as its
        custom_op (kernels/utils.py: use_custom_op). "auto": the custom ops where the Triton
        kernels run, elsewhere their PyTorch form through autograd, which keeps the activations
        instead of recomputing them (a third of the elementwise passes, on a CPU where they are
        slow and memory is plentiful) and dispatches no custom op. "always": the ops everywhere
        (on the CPU their own PyTorch path): the GPU's op structure on any device
        (bench/op_count.py counts it on meta tensors).
    """

    def __init__(
        self,
        config=None,
        *,
        fused_cells: bool = False,
        backward_convs: str = "aten",
        gates_in_one_dot: bool = False,
        cpu_core_layout: str = "auto",
        custom_ops: str = "auto",
    ):
        from gqn_fast.kernels.conv_cell import BACKWARD_CONVS

        super().__init__(config)
        for name, value, allowed in (
            ("backward_convs", backward_convs, BACKWARD_CONVS),
            ("cpu_core_layout", cpu_core_layout, CPU_CORE_LAYOUTS),
            ("custom_ops", custom_ops, CUSTOM_OP_CHOICES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        for name, value in (("fused_cells", fused_cells), ("gates_in_one_dot", gates_in_one_dot)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        self.fused_cells, self.backward_convs, self.gates_in_one_dot = fused_cells, backward_convs, gates_in_one_dot
        self.cpu_core_layout, self.custom_ops = cpu_core_layout, custom_ops

    def _split(self, core, runs) -> Pieces:
        weight = core.cell.conv.weight
        channels_last = self._cores_channels_last(weight)
        pieces = split_runs(weight, core.layout, runs, contiguous_grad=channels_last)
        if self.config.share_cores and channels_last:
            # A shared core's pieces are read L times: one channels-last copy per forward saves
            # oneDNN a reorder per call. (In NCHW oneDNN reorders to its blocked layout anyway,
            # and a piece read once gains nothing from a copy, which would also stay alive.)
            return {run: piece.contiguous(memory_format=torch.channels_last) for run, piece in pieces.items()}
        return pieces

    def _image_logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        """conv1x1(u_L) from the generator states, u_L = sum_l convT_l(h_l), never building u."""
        upsamples = [core.upsample_h for core in self.generator_cores]
        return image_logits(states, upsamples, self.observation, self.config.share_cores)

    def _prior(self, h_g, batch: int):
        if h_g is None:
            return self.prior.bias.view(1, -1, 1, 1).expand(batch, -1, GRID_SIZE, GRID_SIZE).chunk(2, dim=1)
        return self.prior(h_g).chunk(2, dim=1)

    def _cell(self, x, weight, constant, c):
        """(h, c') of a ConvLSTM cell from its step-varying input x and the hoisted `constant`.

        Unfused (cuDNN or the CPU's conv, then the gate kernel), or fused (the 5x5 conv with the
        gates in its epilogue) with fused_cells.
        """
        if self.fused_cells:
            dtype = _conv_dtype(weight)
            return conv_lstm_cell(
                x.to(dtype),
                weight.to(dtype),
                constant,
                c,
                backward_convs=self.backward_convs,
                gates_in_one_dot=self.gates_in_one_dot,
            )
        preact = F.conv2d(self._core_layout(x), weight, padding=weight.shape[-1] // 2)
        if self.config.share_cores:
            # The constant lives through all L steps anyway: the gate kernel reads it in its own
            # pass (no add writing the preactivations once more).
            return self._gates(preact, c, constant)
        # Read by this step alone: added in place, so that backward keeps no copy of it (the
        # gate kernel would save it, a [B, 4H, 16, 16] tensor per step).
        return self._gates(preact.add_(constant), c)

    def _gates(self, preact, c, constant=None):
        """The gate math of preact (+ constant, read in the kernel's own pass). The op reads a bf16
        preact (autocast) as it is, with no fp32 copy first."""
        return lstm_gates(preact, c, constant, custom_op=self.custom_ops)

    def _sample_kl(self, mu_q, s_q, mu_p, s_p, eps):
        """The posterior sample and its KL (kernels.posterior_sample_kl)."""
        return posterior_sample_kl(mu_q, s_q, mu_p, s_p, eps, custom_op=self.custom_ops)

    def _elbo_of(self, states: list[torch.Tensor], kls: list[torch.Tensor], query_x, sigma) -> ELBO:
        """The ELBO from the steps' generator states and KLs."""
        logits = self._image_logits(states)
        nll = pixel_nll(query_x, logits.to(query_x.dtype), sigma, custom_op=self.custom_ops)
        kl = torch.stack(kls, dim=1)
        loss = (nll + kl.sum(dim=1)).mean()
        return ELBO(loss=loss, nll=nll, kl=kl, mean=torch.sigmoid(logits))

    def _zeros(self, batch, like):
        return self._core_layout(like.new_zeros(batch, self.config.hidden, GRID_SIZE, GRID_SIZE))


class GQN(FastCores, reference.GQN):
    """The fast GQN. Constructor, methods, outputs and parameter names as gqn_fast.reference.GQN;
    the constructor's choices are FastCores'."""

    def represent(self, context_x, context_v) -> torch.Tensor:
        return self._representation(context_x, context_v).expand(-1, -1, GRID_SIZE, GRID_SIZE)

    # A core's weight is split when its first step comes, not all at the start of the forward:
    # autograd runs a split's backward (the pieces' gradients concatenated, a transient second
    # copy of the weight's gradient) in reverse order of creation, so splits made first would
    # all run last, each beside every weight gradient and the representation net's activations,
    # raising the training peak. The first core's are split before the representation net runs,
    # so that their split's backward comes after the net's and not beside its activations.

    def _core_pieces(self, core: int, inference: bool = True) -> CorePieces:
        r_is_vector = self.config.r_is_vector
        return CorePieces(
            inference=self._split(self.inference_cores[core], inference_runs(r_is_vector)) if inference else None,
            generator=self._split(self.generator_cores[core], generator_runs(r_is_vector)),
        )

    def _inference_cell(self, core: int, pieces: Pieces, scene: SceneInput, query_x) -> InferenceCell:
        module = self.inference_cores[core]
        conv = module.cell.conv
        x_down = module.downsample_x(self._core_layout(query_x))
        constant = F.conv2d(x_down, pieces[X_Q], conv.bias, padding=conv.padding).add_(scene.share(pieces))
        return InferenceCell(step_weight=pieces[INFERENCE_STEP], constant=constant)

    def _generator_cell(self, core: int, pieces: Pieces, scene: SceneInput) -> GeneratorCell:
        module = self.generator_cores[core]
        # Not in place: the closed form's output is a view, and autograd would record an
        # in-place add to a view as a copy of its whole base (CopySlices).
        constant = scene.share(pieces) + module.cell.conv.bias.view(-1, 1, 1)
        step_weight = pieces[GENERATOR_STEP]
        z_weight = group_of(step_weight, GENERATOR_STEP, module.layout, "z") if core == 0 else None
        return GeneratorCell(step_weight=step_weight, z_weight=z_weight, constant=constant)

    def _cells_by_step(self, first: CorePieces, scene: SceneInput, query_x=None) -> Iterator[StepCells]:
        """Each step's cells, in step order: a core's made when its first step comes, core 0's from
        `first`. Without query_x (generate), the generator cells alone."""
        cores = len(self.generator_cores)
        pieces = first
        for core in range(cores):
            if core > 0:
                pieces = self._core_pieces(core, inference=query_x is not None)
            cells = StepCells(
                inference=None if query_x is None else self._inference_cell(core, pieces.inference, scene, query_x),
                generator=self._generator_cell(core, pieces.generator, scene),
            )
            for _ in range(self.config.L // cores):  # a shared core's L steps, or one core's one
                yield cells

    # Step 1 starts from zero states. A zero h is None here, never a tensor of zeros: every conv
    # over it contributes nothing and is skipped, in the three places that read an h (_prior,
    # _inference_step, _generator_step; generate's whole cells, the reference's conv, are given
    # zeros); the canvas view is then its bias, the same for every scene. The cell states c start
    # as zeros (the gates read them).

    def _inference_step(self, cell: InferenceCell, h_g, canvas: CanvasView, h_e, c_e):
        if h_g is None:  # h_e too: the whole step input is a constant vector, its share a closed form
            zeros = canvas.start.new_zeros(self.config.hidden)
            start = in_order(INFERENCE_STEP, dim=0, h_g=zeros, u=canvas.start, h_e=zeros)[None]
            return self._gates(cell.constant + constant_conv(start, cell.step_weight, GRID_SIZE), c_e)
        x = in_order(INFERENCE_STEP, h_g=h_g, u=canvas.take(), h_e=h_e)
        return self._cell(x, cell.step_weight, cell.constant, c_e)

    def _generator_step(self, cell: GeneratorCell, z, h_g, c_g):
        if h_g is None:
            return self._cell(z, cell.z_weight, cell.constant, c_g)
        return self._cell(in_order(GENERATOR_STEP, z=z, h_g=h_g), cell.step_weight, cell.constant, c_g)

    def elbo(self, context_x, context_v, query_x, query_v, sigma, noise=None) -> ELBO:
        self.check_inputs(context_x, context_v, query_v, query_x=query_x, sigma=sigma, noise=noise)
        c = self.config
        B = query_x.shape[0]

        first = self._core_pieces(0)  # before the representation net (see _core_pieces)
        scene = SceneInput(query_v, self._representation(context_x, context_v), c.r_is_vector)
        canvas = CanvasView(self)
        h_g = h_e = None  # zero states
        c_g, c_e = self._zeros(B, query_x), self._zeros(B, query_x)
        kls, states = [], []
        for step, cells in enumerate(self._cells_by_step(first, scene, query_x)):
            mu_p, s_p = self._prior(h_g, B)
            h_e, c_e = self._inference_step(cells.inference, h_g, canvas, h_e, c_e)
            mu_q, s_q = self.posterior(h_e).chunk(2, dim=1)
            # In the state's dtype: under autocast mu_q is bf16, and bf16 draws would be coarse.
            eps = _standard_normal(mu_q, h_e.dtype) if noise is None else noise[step]
            z, kl = self._sample_kl(*(t.to(h_e.dtype) for t in (mu_q, s_q, mu_p, s_p, eps)))
            kls.append(kl)
            h_g, c_g = self._generator_step(cells.generator, z, h_g, c_g)
            states.append(h_g)
            canvas.draw(h_g)

        return self._elbo_of(states, kls, query_x, sigma)

    def _generate(self, r, query_v, noise) -> torch.Tensor:
        c = self.config
        if c.r_is_vector:
            r = r[:, :, :1, :1]  # a tiled vector: the closed-form path reads it once
        scene = SceneInput(query_v, self._core_layout(r), c.r_is_vector)
        B = query_v.shape[0]

        # With one core per step and the tower's map r, hoisting saves no work (each core runs
        # once), and generate keeps no activations: what counts is the transient weight reorder,
        # and on the CPU a weight piece costs oneDNN a copy besides it. There each cell is the
        # reference's conv over all its inputs with the whole weight: the lower memory peak.
        whole_cells = not c.share_cores and not c.r_is_vector and self._pytorch_cpu(query_v)
        cells = None if whole_cells else self._cells_by_step(self._core_pieces(0, inference=False), scene)
        h_g, c_g = None, self._zeros(B, query_v)  # zero states
        states = []
        for step in range(c.L):
            mu_p, s_p = self._prior(h_g, B)
            eps = _standard_normal(mu_p) if noise is None else noise[step]
            z = mu_p + F.softplus(s_p) * eps
            if whole_cells:
                h = self._zeros(B, query_v) if h_g is None else h_g
                h_g, c_g = self._whole_cell(
                    self.generator_cores[step], c_g, v_q=tile(query_v, GRID_SIZE), r=scene.r_map, z=z, h_g=h
                )
            else:
                h_g, c_g = self._generator_step(next(cells).generator, z, h_g, c_g)
            states.append(h_g)
        return torch.sigmoid(self._image_logits(states))

    def _whole_cell(self, core, c, **inputs: torch.Tensor):
        """A cell as the reference computes it: one conv over all its inputs (named, taken in
        layout order) with the whole weight and bias, then the gates."""
        conv = core.cell.conv
        x = self._core_layout(in_order(core.layout, **inputs))
        return self._gates(F.conv2d(x, conv.weight, conv.bias, padding=conv.padding), c)


def compile_options(model: torch.nn.Module) -> dict:
    """torch.compile's inductor options for `model`: for a fast GQN on the CPU, no layout
    optimization. Inductor would turn every conv channels-last, the slower layout for the paper's
    cells (CHANNELS_LAST_MAX_GATES) and one that costs a weight reorder per call, making the
    compiled step slower than eager. The model picks each conv's layout itself. {} for any other
    model."""
    if isinstance(model, FastCores) and model.prior.weight.device.type == "cpu":
        return {"layout_optimization": False}
    return {}
