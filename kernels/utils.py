"""What every fused op shares: the dispatch decision, input checks, tiling, and the
numerically careful activations, once as Triton device functions and once in PyTorch.

Dispatch (here, asked once by each op's public function: `use_custom_op`, then inside the op
`use_triton`): CUDA tensors run the Triton kernels; CPU tensors run the same fp32 math in plain
PyTorch, or the Triton kernels under Triton's interpreter when TRITON_INTERPRET=1 was set before
import. The mode is fixed at import, as @triton.jit fixes it (the tests run the interpreter in a
pytest process of its own: tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # Triton ships for Linux only; elsewhere every op runs its PyTorch path.
    HAS_TRITON = False

    class _TritonMissing:
        """Stands in for `triton` and `triton.language`: kernels are defined, never launched."""

        constexpr = float64 = float32 = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _TritonMissing()


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------


def _interpreter_requested() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4 parses TRITON_INTERPRET here
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, here: @triton.jit makes each kernel compiled or interpreted when it is defined.
_INTERPRETER = HAS_TRITON and _interpreter_requested()
_pytorch_path_forced = False


def interpreter_enabled() -> bool:
    """Whether the kernels are Triton-interpreted (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETER


@contextlib.contextmanager
def pytorch_path():
    """CPU tensors take the ops' PyTorch path inside this block, even under the interpreter:
    to compare the interpreted kernels with the PyTorch math in one process."""
    global _pytorch_path_forced
    previous, _pytorch_path_forced = _pytorch_path_forced, True
    try:
        yield
    finally:
        _pytorch_path_forced = previous


def use_triton(tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """True: run the op's Triton kernels on `tensor`'s device; False: its PyTorch path.

    CUDA always takes the kernels (also while torch.compile traces them via wrap_triton).
    CPU takes them only under the interpreter, and only in eager mode on real tensors: the
    interpreter runs Python on real memory, so FakeTensors and compiled graphs get the
    PyTorch path (same math, same shapes and strides). dtypes: the ones the op's kernels take
    (None: every float dtype); a tensor of another runs the PyTorch path.
    """
    if not HAS_TRITON or not isinstance(tensor, torch.Tensor):
        return False
    if dtypes is not None and tensor.dtype not in dtypes:
        return False
    if tensor.device.type == "cuda":
        return True
    return (
        _INTERPRETER
        and tensor.device.type == "cpu"
        and not _pytorch_path_forced
        and not torch.compiler.is_compiling()
        and type(tensor) in (torch.Tensor, torch.nn.Parameter)
    )


CUSTOM_OP_CHOICES = ("auto", "always")


def use_custom_op(tensor: torch.Tensor, custom_op: str) -> bool:
    """How an op's public function runs on `tensor`, decided there once per call. True: through
    its torch.library op, which launches the Triton kernels where use_triton says so and runs
    their math in PyTorch elsewhere, under the kernels' backward (it recomputes the activations,
    with tail-accurate derivatives). False: the op's PyTorch form, differentiated by autograd.

    custom_op: "always", the op on every device (the GPU's op structure anywhere), or "auto",
    the op only where the kernels run: elsewhere autograd keeps the activations instead of
    recomputing them, and no custom op is dispatched, which is faster on a CPU.
    """
    if custom_op not in CUSTOM_OP_CHOICES:
        raise ValueError(f"custom_op: expected one of {CUSTOM_OP_CHOICES}, got {custom_op!r}")
    return custom_op == "always" or use_triton(tensor)


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel), so torch.compile can trace the launch; under the
    interpreter the kernel itself (torch wraps only compiled kernels, and only eager CPU
    tensors reach an interpreted one: see use_triton).

    Same name as torch's on purpose: torch.library.triton_op finds an op's kernels by looking
    for `wrap_triton(<kernel>)` calls in its source (they go into torch.compile's cache key).
    """
    if _INTERPRETER:
        return kernel
    return torch.library.wrap_triton(kernel)


def launch_device(tensor: torch.Tensor):
    """Make the tensor's GPU current while launching: Triton launches on the current device.

    Not while compiling: the compiled graph guards the device itself.
    """
    if tensor.device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# Input checks: errors name the argument, what was expected and what was received
# ---------------------------------------------------------------------------------------


def check_floating(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float32, float16, bfloat16 or float64), "
            f"got dtype {tensor.dtype}"
        )


def check_like(name: str, tensor, ref_name: str, ref: torch.Tensor, shape=None, same_dtype: bool = True) -> None:
    """`tensor` is a float tensor on ref's device, with ref's dtype (or, without same_dtype, one
    computed in the same precision: float64 with float64, else any of float32, float16 and
    bfloat16) and the given (or ref's) shape."""
    check_floating(name, tensor)
    if tensor.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {tensor.device}")
    if same_dtype:
        if tensor.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (as {ref_name}), got {tensor.dtype}")
    elif (tensor.dtype == torch.float64) != (ref.dtype == torch.float64):
        expected = "torch.float64" if ref.dtype == torch.float64 else "float32, float16 or bfloat16"
        raise TypeError(
            f"{name}: expected dtype {expected} (as {ref_name} is {ref.dtype}: float64 computes in "
            f"float64, the others in float32), got {tensor.dtype}"
        )
    shape = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} (from {ref_name}), got {list(tensor.shape)}")


def check_per_sample(name: str, tensor, ref_name: str, ref: torch.Tensor) -> None:
    """`tensor` is a float tensor [B] on ref's device, B = ref's batch: the gradient of a
    per-sample sum over ref."""
    check_floating(name, tensor)
    if tuple(tensor.shape) != (ref.shape[0],) or tensor.device != ref.device:
        raise ValueError(
            f"{name}: expected shape [{ref.shape[0]}] on {ref.device} (as {ref_name}'s batch), "
            f"got {list(tensor.shape)} on {tensor.device}"
        )


def check_min_dim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() < ndim:
        raise ValueError(f"{name}: expected at least {ndim} dims {layout}, got shape {list(tensor.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels compute in fp32, or in fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Layout and tiling: every op sees its tensors as [batch, channel, space]
# ---------------------------------------------------------------------------------------


def as_batch_channel_space(tensor: torch.Tensor) -> torch.Tensor:
    """[B], [B, C] or [B, C, *spatial] as a 3-d [B, C, S] tensor.

    A view (strides kept: contiguous and channels_last both merge their spatial dims) unless
    the spatial dims cannot merge into one stride, where flatten copies: the kernels take one
    stride per dim of this 3-d view.
    """
    if tensor.dim() == 1:
        return tensor[:, None, None]
    if tensor.dim() == 2:
        return tensor[:, :, None]
    return tensor.flatten(2)


def empty_output_like(view3d: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """A new tensor for a kernel to fill, as (3-d view to write through, tensor of `shape`).

    torch.empty_like keeps the 3-d view's strides when it is dense (so a channels_last input
    gives a channels_last output) and is contiguous otherwise; splitting S back into the
    spatial dims is always a view, so the kernel's writes land in the returned tensor.
    """
    out3d = torch.empty_like(view3d)
    return out3d, out3d.view(shape)


def tile_shape(channels: int, space: int, channels_contiguous: bool, max_tile: int = 1024) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) for a 2-d tile of at most `max_tile` elements.

    The tile spans as much as it can of the dim with unit stride (channels for
    channels_last, space otherwise) so loads coalesce, and fills the rest with the other dim.
    """
    pow2 = lambda n: 1 << max(int(n) - 1, 0).bit_length()  # noqa: E731 (next power of two >= n)
    if channels_contiguous:
        block_c = min(pow2(channels), max_tile)
        block_s = min(pow2(space), max(max_tile // block_c, 1))
    else:
        block_s = min(pow2(space), max_tile)
        block_c = min(pow2(channels), max(max_tile // block_s, 1))
    return block_c, block_s


def launch_shape(view3d: torch.Tensor) -> tuple[tuple[int, int, int], int, int]:
    """(grid, BLOCK_C, BLOCK_S) of the elementwise kernels over a [B, C, S] view: one program
    per (space tile, channel tile, sample), so per-sample sums are partial sums per program."""
    batch, channels, space = view3d.shape
    block_c, block_s = tile_shape(channels, space, channels_contiguous(view3d))
    grid = (triton.cdiv(space, block_s), triton.cdiv(channels, block_c), batch)
    return grid, block_c, block_s


def empty_partial_sums(view3d: torch.Tensor, grid) -> torch.Tensor:
    """The [B, tiles] buffer in which each program on `grid` (launch_shape's) writes its share of
    a per-sample sum (store_partial_sum), in the compute dtype; .sum(dim=1) adds the shares in a
    fixed order: deterministic, no atomics."""
    return torch.empty((view3d.shape[0], grid[0] * grid[1]), dtype=compute_dtype(view3d.dtype), device=view3d.device)


def channels_contiguous(view3d: torch.Tensor) -> bool:
    return view3d.stride(1) == 1 and view3d.shape[2] > 1 and view3d.stride(2) != 1


# ---------------------------------------------------------------------------------------
# Triton device helpers (fp32, or fp64 for fp64 inputs). NaN in gives NaN out in each.
# ---------------------------------------------------------------------------------------


@triton.jit
def to_compute(x):
    """fp16 / bf16 / fp32 to fp32; fp64 stays fp64."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def tile_indices(channels, space, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's tile of [B, C, S] on the grid (space tiles, channel tiles, batch):
    (b, channel offsets [BLOCK_C, 1], space offsets [1, BLOCK_S], in-bounds mask).

    int64 offsets: a batch of 4H x Y x X preactivations can pass 2^31 elements.
    """
    b = tl.program_id(2).to(tl.int64)
    ch = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[:, None]
    sp = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)[None, :]
    return b, ch, sp, (ch < channels) & (sp < space)


@triton.jit
def load_tile(ptr, b, ch, sp, stride_b, stride_c, stride_s, mask):
    """A tile of a [B, C, S] tensor with the given strides, in the compute dtype (0 where masked)."""
    return to_compute(tl.load(ptr + b * stride_b + ch * stride_c + sp * stride_s, mask=mask, other=0.0))


@triton.jit
def store_tile(ptr, value, b, ch, sp, stride_b, stride_c, stride_s, mask):
    """Write a tile into a [B, C, S] tensor with the given strides, rounded to its dtype."""
    tl.store(ptr + b * stride_b + ch * stride_c + sp * stride_s, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_partial_sum(partial_ptr, values, b):
    """This program's sum of a tile of values (0 where masked) into partial[b, its tile]
    (empty_partial_sums), on the grid (space tiles, channel tiles, batch)."""
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tiles_per_sample = tl.num_programs(0) * tl.num_programs(1)
    tl.store(partial_ptr + b * tiles_per_sample + tile, tl.sum(tl.sum(values, axis=1), axis=0))


@triton.jit
def log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate where 1 + e rounds (no libdevice log1p).

    log(u) * e / (u - 1) with u = 1 + e cancels the rounding of u (u - 1 is exact).
    """
    u = 1.0 + e
    rounded_away = u == 1.0  # e below half an ulp of 1: log(1 + e) = e to working precision
    return tl.where(rounded_away, e, tl.log(u) * (e / tl.where(rounded_away, 1.0, u - 1.0)))


@triton.jit
def stable_softplus(x):
    """log(1 + exp(x)) as torch.nn.functional.softplus (beta 1, threshold 20): x above 20."""
    e = tl.exp(-tl.abs(x))
    soft = tl.where(x > 0.0, x, 0.0) + log1p_small(e)
    return tl.where(x > 20.0, x, soft)


@triton.jit
def softplus_derivative(x):
    """d softplus / dx = sigmoid(x), and 1 above the threshold, as PyTorch's backward."""
    return tl.where(x > 20.0, 1.0, tl.sigmoid(x))


@triton.jit
def sigmoid_derivative(x):
    """sigmoid(x) sigmoid(-x): accurate in the tails, where sigmoid(x) (1 - sigmoid(x)) is 0."""
    return tl.sigmoid(x) * tl.sigmoid(-x)


@triton.jit
def accurate_tanh(x):
    """tanh without libdevice: 2 sigmoid(2|x|) - 1 with the sign put back, except near 0.

    2 sigmoid(2x) - 1 cancels for small |x| (relative error ~1e-7 / |x|); there fp32 uses the
    Cephes tanhf polynomial (|x| < 0.625, about 1 ulp). fp64 keeps the exp form: its absolute
    error ~1e-16 is what gradcheck needs.
    """
    a = tl.abs(x)
    t = 2.0 * tl.sigmoid(2.0 * a) - 1.0
    if x.dtype == tl.float32:
        z = a * a
        p = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
        t = tl.where(a < 0.625, a + a * z * (p - 3.33332819422e-1), t)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def tanh_derivative(x):
    """1 - tanh(x)^2 as 4 e / (1 + e)^2, e = exp(-2|x|): no cancellation when |tanh x| ~ 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


# ---------------------------------------------------------------------------------------
# The same activations in PyTorch, for the CPU path
# ---------------------------------------------------------------------------------------


def sigmoid_derivative_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x) * torch.sigmoid(-x)


def tanh_derivative_torch(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-2.0 * x.abs())
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


def softplus_derivative_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 20.0, torch.ones_like(x), torch.sigmoid(x))
