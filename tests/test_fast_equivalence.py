"""gqn_fast.GQN against the reference: same weights, same noise, same numbers and gradients.

The reference runs in float64 as the oracle; the fast model runs in the dtype under test with
the same weights rounded to it, so the error measured is the fast path's own. Its limit is the
dtype's RMS limit, or, where the quantity itself is ill-conditioned (a KL near zero is a sum of
cancelling terms), 4x the error of the reference itself run in that dtype: the fast path may not
be worse than plain PyTorch at the same precision.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gqn_fast.reference import GQN as ReferenceGQN
from helpers import (
    RMS_LIMITS,
    assert_close_rms,
    assert_state_dicts_load_both_ways,
    compare_with_reference,
    is_canvas,
    random_scene_batch,
    shapes_saved_for_backward,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gqn_fast import GQN, GQNConfig, kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from op_count import OpCounter  # noqa: E402


@st.composite
def configs(draw, max_L=3):
    representation = draw(st.sampled_from(["tower", "pool", "pyramid"]))
    return GQNConfig(
        representation=representation,
        L=draw(st.integers(1, max_L)),
        z_dim=draw(st.integers(1, 4)),
        hidden=draw(st.integers(2, 10)),
        canvas=draw(st.integers(2, 10)),
        r_dim=draw(st.sampled_from([8, 16, 24])),
        share_cores=draw(st.booleans()),
    )


def compare(
    config, batch, views, seed, dtype=torch.float32, sigma=0.7, device="cpu", classes=(ReferenceGQN, GQN), **choices
):
    """Every output and every gradient of fast (in dtype, on device; built with the constructor's
    choices) against the float64 reference (on the CPU); the plain reference runs beside fast, in
    the same dtype and place. classes: the reference's and the fast model's (another of the family)."""
    make_data = lambda: random_scene_batch(batch, views, dtype=torch.float64)
    compare_with_reference(*classes, config, make_data, seed, dtype, sigma, device, **choices)


@given(
    config=configs(max_L=4),  # L = 4: the canvas shares of three later steps pending at once
    batch=st.integers(1, 3),
    views=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    fused_cells=st.sampled_from([False, True]),
)
def test_cpu_path_matches_reference(config, batch, views, seed, fused_cells):
    """CPU: the unfused cells (the default there), and the fused op's PyTorch path."""
    compare(config, batch, views, seed, fused_cells=fused_cells)


@given(config=configs(), batch=st.integers(1, 3), untiled=st.booleans(), seed=st.integers(0, 2**16))
def test_generate_from_a_given_r_matches_reference(config, batch, untiled, seed):
    """Any r, not one the net made (scene algebra): the tower's map, or the vector of pool and
    pyramid, tiled as `represent` returns it or untiled."""
    torch.manual_seed(seed)
    oracle = ReferenceGQN(config).double()
    fast = GQN(config)
    fast.load_state_dict(oracle.state_dict())
    size = 16 if config.representation == "tower" else 1
    r = torch.randn(batch, config.r_dim, size, size, dtype=torch.float64)
    if not untiled:
        r = r.expand(-1, -1, 16, 16)
    query_v = torch.randn(batch, 7, dtype=torch.float64)
    noise = torch.randn(config.L, batch, config.z_dim, 16, 16, dtype=torch.float64)
    want = oracle.generate_from(r, query_v, noise=noise)
    got = fast.generate_from(r.float(), query_v.float(), noise=noise.float())
    assert_close_rms(got, want, RMS_LIMITS[torch.float32], "generate_from")


@pytest.mark.parametrize("cls", [GQN, ReferenceGQN], ids=["fast", "reference"])
def test_generate_from_names_a_bad_r(cls):
    tower, pool = cls(GQNConfig.preset("small", L=1)), cls(GQNConfig.preset("small", L=1, representation="pool"))
    query_v = torch.zeros(2, 7)
    r_dim = tower.config.r_dim
    with pytest.raises(ValueError, match=r"r: expected shape \[B, 64, 16, 16\], got \[2, 64, 1, 1\]"):
        tower.generate_from(torch.zeros(2, r_dim, 1, 1), query_v)  # the tower's r is a map
    with pytest.raises(ValueError, match=r"or \[B, 64, 1, 1\], got \[2, 32, 1, 1\]"):
        pool.generate_from(torch.zeros(2, 32, 1, 1), query_v)
    with pytest.raises(ValueError, match="varies over the grid"):
        pool.generate_from(torch.randn(2, r_dim, 16, 16), query_v)
    with pytest.raises(ValueError, match="query_v: expected batch size 3 as in r, got 2"):
        tower.generate_from(torch.zeros(3, r_dim, 16, 16), query_v)
    with pytest.raises(ValueError, match="r: contains NaN"):
        tower.generate_from(torch.full((2, r_dim, 16, 16), float("nan")), query_v)
    with pytest.raises(TypeError, match="r: expected the model's dtype"):
        tower.generate_from(torch.zeros(2, r_dim, 16, 16, dtype=torch.float64), query_v)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last-cores", "nchw-cores"])
@pytest.mark.parametrize("share_cores", [False, True], ids=["unshared", "shared"])
def test_both_cpu_core_layouts_match_reference(channels_last, share_cores):
    """The CPU path runs the cores channels-last or NCHW by their width (CHANNELS_LAST_MAX_GATES):
    both layouts, forced on one configuration, compute the reference's function."""
    cpu_core_layout = "channels_last" if channels_last else "contiguous"
    config = GQNConfig(representation="tower", L=3, z_dim=2, hidden=6, canvas=5, r_dim=8, share_cores=share_cores)
    compare(config, batch=2, views=2, seed=1, cpu_core_layout=cpu_core_layout)


@pytest.mark.parametrize("share_cores", [False, True])
def test_small_preset_matches_reference(share_cores):
    compare(GQNConfig.preset("small", share_cores=share_cores, L=3), batch=2, views=2, seed=0)


def test_state_dict_loads_both_ways():
    config = GQNConfig.preset("small")
    assert_state_dicts_load_both_ways(ReferenceGQN(config), GQN(config))


def test_no_canvas_is_saved_for_backward():
    """The reference keeps 128x64x64-style canvases for backward; the fast path keeps none."""
    config = GQNConfig.preset("small", L=3)
    saved = {
        name: shapes_saved_for_backward(cls(config), random_scene_batch(2, 2))
        for name, cls in [("fast", GQN), ("reference", ReferenceGQN)]
    }
    assert any(is_canvas(s, config.canvas) for s in saved["reference"])
    assert not any(is_canvas(s, config.canvas) for s in saved["fast"])


class NewTensors(TorchDispatchMode):
    """Records the size of every tensor an op allocates: outputs sharing no storage with its inputs
    (views, detach and in-place results are not allocations)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("representation", ["tower", "pool"])
@pytest.mark.parametrize("share_cores", [False, True], ids=["unshared", "shared"])
def test_no_weight_sized_tensor_is_allocated_per_step(representation, share_cores):
    """Forward and backward allocate one tensor the size of a cell weight (or larger) per cell
    weight: its gradient. A per-step slice of a weight would add a zero-filled gradient per
    step, a concatenation of weights a larger tensor; the reference's conv backward makes one
    weight gradient per step (and its canvases are that large too at these sizes)."""
    for L in (2, 4):
        config = GQNConfig(
            representation=representation, L=L, z_dim=2, hidden=8, canvas=8, r_dim=16, share_cores=share_cores
        )
        counts = {}
        for name, cls in [("fast", GQN), ("reference", ReferenceGQN)]:
            model = cls(config)
            # Activations at B = 1 are smaller than the smallest cell weight.
            weight_sized = min(core.cell.conv.weight.numel() for core in model.generator_cores)
            data = random_scene_batch(1, 1)
            with NewTensors() as new:
                model.elbo(*data, sigma=0.7).loss.backward()
            counts[name] = sum(size >= weight_sized for size in new.sizes)
        n_cores = 1 if share_cores else L
        assert counts["fast"] == 2 * n_cores, (L, counts)
        assert counts["reference"] >= 2 * L, (L, counts)  # the counter sees per-step weight gradients


def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    config = GQNConfig(representation="pool", L=2, z_dim=2, hidden=4, canvas=4, r_dim=8)
    model = GQN(config)
    batch = random_scene_batch(2, 2)
    noise = torch.randn(2, 2, 2, 16, 16)
    compiled = torch.compile(model.elbo, fullgraph=True, backend="aot_eager")
    eager = model.elbo(*batch, sigma=0.7, noise=noise)
    out = compiled(*batch, sigma=0.7, noise=noise)
    assert_close_rms(out.loss, eager.loss, 1e-6, "compiled loss")
    params = list(model.parameters())  # step 1 reads no canvas: the first downsample_u is unused
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    eager_grads = torch.autograd.grad(eager.loss, params, allow_unused=True)
    for g, e in zip(grads, eager_grads):
        assert (g is None) == (e is None)
        if g is not None:
            assert_close_rms(g, e, 1e-5, "compiled grad")


def fused_calls(counter: OpCounter) -> int:
    """The calls of the fused conv + gates op while counter was on."""
    return counter.custom["conv_lstm_cell"]


# With fused_cells, every cell with a step-varying input is fused: two per step in elbo, one in
# generate; the first inference cell reads only constants (closed form) and runs the gate kernel alone.
def fused_cells_per_run(config):
    return 3 * config.L - 1


@pytest.mark.interpreter
@given(config=configs(max_L=2), batch=st.integers(1, 2), seed=st.integers(0, 2**16), fused_cells=st.booleans())
@settings(max_examples=4)
def test_triton_path_matches_reference_under_interpreter(config, batch, seed, fused_cells):
    """The same comparison with the Triton kernels running in Triton's CPU interpreter: the gate
    kernel after each cell's conv (the default), or the fused conv + gates cells."""
    assert kernels.use_triton(torch.zeros(1)), "the kernels did not take the Triton path"
    with OpCounter() as counter:
        compare(config, batch, views=1, seed=seed, fused_cells=fused_cells)
    assert fused_calls(counter) == (fused_cells_per_run(config) if fused_cells else 0)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "fused_cells,backward_convs",
    [(False, "aten"), (True, "aten"), (True, "triton")],
    ids=["unfused", "fused-aten-bwd", "fused-triton-bwd"],
)
@pytest.mark.parametrize("share_cores", [False, True])
def test_cuda_cells_match_reference(share_cores, fused_cells, backward_convs, monkeypatch):
    """On a GPU, in strict fp32 (TF32 off for cuDNN and matmuls alike)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = GQNConfig.preset("small", share_cores=share_cores, L=3)
    with OpCounter() as counter:
        compare(config, batch=4, views=2, seed=0, fused_cells=fused_cells, backward_convs=backward_convs, device="cuda")
    assert fused_calls(counter) == (fused_cells_per_run(config) if fused_cells else 0)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_cuda_cells_match_reference_at_the_paper_tower(tf32, monkeypatch):
    """The paper's tower (one core per step, L = 12, hidden 128) at B = 4 on a GPU, every output
    and gradient: in strict fp32 within fp32's limit; with TF32 (cuDNN's and the matmuls' default
    in bench/) within 4x the plain reference's own TF32 error."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    compare(GQNConfig.preset("paper"), batch=4, views=2, seed=0, device="cuda")


@pytest.mark.interpreter
def test_triton_backward_convs_match_reference_under_interpreter():
    config = GQNConfig(representation="pool", L=2, z_dim=2, hidden=5, canvas=3, r_dim=8, share_cores=False)
    compare(config, batch=1, views=1, seed=0, fused_cells=True, backward_convs="triton")


@pytest.mark.interpreter
def test_cells_are_unfused_by_default_under_interpreter():
    config = GQNConfig(representation="pool", L=2, z_dim=2, hidden=4, canvas=3, r_dim=8)
    with OpCounter() as counter:
        compare(config, batch=1, views=1, seed=0)
    assert fused_calls(counter) == 0 and counter.custom["lstm_gates"] > 0


@pytest.mark.parametrize(
    "share_cores,path,fused_cells",
    [
        (False, "cpu", False), (True, "cpu", False),
        pytest.param(False, "interpreter", True, marks=pytest.mark.interpreter),
        pytest.param(True, "interpreter", False, marks=pytest.mark.interpreter),
        pytest.param(False, "cuda", False, marks=pytest.mark.cuda),
        pytest.param(True, "cuda", False, marks=pytest.mark.cuda),
        pytest.param(False, "cuda", True, marks=pytest.mark.cuda),
    ],
    ids=["unshared", "shared", "interpreter-fused", "interpreter-shared", "cuda-unshared", "cuda-shared", "cuda-fused"],
)  # fmt: skip
def test_bf16_autocast_matches_reference(share_cores, path, fused_cells):
    """Under bf16 autocast the fast model stays within bf16's limit: on the CPU's PyTorch path;
    under the interpreter and on a GPU with the fused cells (bf16 operands, upcast by the
    interpreter for the products) or the default cells (a bf16 conv output read as it is by the
    gate kernel, beside the fp32 cell state, with shared cores the constant too)."""
    device = "cuda" if path == "cuda" else "cpu"
    assert kernels.use_triton(torch.zeros(1, device=device)) == (path != "cpu")
    config = GQNConfig(representation="tower", L=2, z_dim=2, hidden=8, canvas=8, r_dim=16, share_cores=share_cores)
    torch.manual_seed(0)
    oracle, fast = ReferenceGQN(config).double(), GQN(config, fused_cells=fused_cells).to(device)
    fast.load_state_dict(oracle.state_dict())
    data = random_scene_batch(2, 2, dtype=torch.float64)
    noise = torch.randn(2, 2, 2, 16, 16, dtype=torch.float64)
    expected = oracle.elbo(*data, sigma=0.7, noise=noise)
    inputs = [t.to(device, torch.float32) for t in data]
    with OpCounter() as counter, torch.autocast(device, dtype=torch.bfloat16):
        got = fast.elbo(*inputs, sigma=0.7, noise=noise.to(device, torch.float32))
        image = fast.generate(inputs[0], inputs[1], inputs[3], noise=noise.to(device, torch.float32))
    assert got.loss.dtype == torch.float32
    for name in ["loss", "nll", "kl", "mean"]:
        assert_close_rms(getattr(got, name).cpu(), getattr(expected, name), RMS_LIMITS[torch.bfloat16], name)
    expected_image = oracle.generate(data[0], data[1], data[3], noise=noise)
    assert_close_rms(image.cpu(), expected_image, RMS_LIMITS[torch.bfloat16], "generate")
    assert fused_calls(counter) == (fused_cells_per_run(config) if fused_cells else 0)


def test_compile_options_keep_the_models_own_layouts():
    """On the CPU the fast model compiles without inductor's layout optimization (which would make
    the paper's cells channels-last, their slower layout); the reference with inductor's defaults."""
    from gqn_fast.model import compile_options

    config = GQNConfig(representation="tower", L=2, z_dim=2, hidden=4, canvas=4, r_dim=8, share_cores=True)
    fast = GQN(config)
    assert compile_options(fast) == {"layout_optimization": False}
    assert compile_options(ReferenceGQN(config)) == {}
    torch._dynamo.reset()
    compiled = torch.compile(fast.elbo, options=compile_options(fast))
    batch, noise = random_scene_batch(2, 1), torch.randn(2, 2, 2, 16, 16)
    assert_close_rms(
        compiled(*batch, sigma=0.7, noise=noise).loss, fast.elbo(*batch, sigma=0.7, noise=noise).loss, 1e-6
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_canvas_maps_match_the_convs_and_keep_the_layout(channels_last):
    """conv1x1 and patch_transposed_conv (the canvas maps) equal F.conv2d and F.conv_transpose2d,
    values and gradients; a channels-last state gets its gradient back channels-last."""
    from gqn_fast.model import conv1x1, patch_transposed_conv

    torch.manual_seed(0)
    h = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    h = h.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w1, b1 = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    wt, bt = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    cases = [
        (lambda t: conv1x1(t, w1, b1), lambda t: F.conv2d(t, w1[:, :, None, None], b1)),
        (lambda t: patch_transposed_conv(t, wt, bt), lambda t: F.conv_transpose2d(t, wt, bt, stride=4)),
    ]
    for ours, theirs in cases:
        h_ours, h_ref = h.clone().requires_grad_(), h.contiguous().requires_grad_()
        got, want = ours(h_ours), theirs(h_ref)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grad_out = torch.randn_like(want)
        (grad,) = torch.autograd.grad(got, h_ours, grad_out)
        (grad_ref,) = torch.autograd.grad(want, h_ref, grad_out)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
        if channels_last:
            assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("preset", ["small", "paper-pool"])
def test_same_seed_same_draws_without_noise(preset):
    """Without `noise`, both models draw the latents' standard normals in the same order and
    layout: under one seed, fast and reference give the same ELBO and the same images."""
    config = (
        GQNConfig.preset("small")
        if preset == "small"
        else GQNConfig(representation="pool", L=3, hidden=8, canvas=8, r_dim=16)
    )
    torch.manual_seed(0)
    oracle = ReferenceGQN(config).double()
    fast = GQN(config).double()
    fast.load_state_dict(oracle.state_dict())
    data = random_scene_batch(2, 2, dtype=torch.float64)
    results = []
    for model in (oracle, fast):
        torch.manual_seed(5)
        loss = model.elbo(*data, sigma=0.7).loss
        torch.manual_seed(6)
        image = model.generate(data[0], data[1], data[3])
        results.append((loss, image))
    (loss_ref, image_ref), (loss, image) = results
    assert_close_rms(loss, loss_ref, RMS_LIMITS[torch.float64], "loss")
    assert_close_rms(image, image_ref, RMS_LIMITS[torch.float64], "generate")


def test_choices_are_constructor_arguments_of_each_model():
    """Two models with different cells live in one process; nothing is set on the class."""
    config = GQNConfig(representation="tower", L=1, z_dim=2, hidden=4, canvas=4, r_dim=8)
    fused, plain = GQN(config, fused_cells=True, backward_convs="triton", gates_in_one_dot=True), GQN(config)
    assert (fused.fused_cells, fused.backward_convs, fused.gates_in_one_dot) == (True, "triton", True)
    assert (plain.fused_cells, plain.backward_convs, plain.gates_in_one_dot) == (False, "aten", False)
    assert "fused_cells" not in vars(GQN) and "backward_convs" not in vars(GQN)
    with pytest.raises(ValueError, match="backward_convs"):
        GQN(config, backward_convs="cudnn")
    with pytest.raises(TypeError, match="fused_cells: expected a bool"):
        GQN(config, fused_cells=1)
    with pytest.raises(
        ValueError, match=r"cpu_core_layout: expected one of \('auto', 'channels_last', 'contiguous'\), got 'nhwc'"
    ):
        GQN(config, cpu_core_layout="nhwc")
    with pytest.raises(ValueError, match=r"custom_ops: expected one of \('auto', 'always'\), got True"):
        GQN(config, custom_ops=True)


@pytest.mark.parametrize("share_cores", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("custom_ops", ["auto", "always"])
def test_custom_ops_choice_reaches_every_op(share_cores, custom_ops):
    """The model passes its custom_ops to every op it calls, and each op decides its path: on the
    CPU's PyTorch path, "auto" dispatches no custom op (their PyTorch forms through autograd) and
    "always" the gate, posterior and pixel likelihood ops, one per cell and step, step, and elbo."""
    config = GQNConfig(representation="pool", L=2, z_dim=2, hidden=3, canvas=3, r_dim=8, share_cores=share_cores)
    model, data = GQN(config, custom_ops=custom_ops), random_scene_batch(2, 1)
    with OpCounter() as counter:
        model.elbo(*data, sigma=0.7).loss.backward()
        model.generate(data[0], data[1], data[3])
    expected = {"lstm_gates": 3 * config.L, "posterior_sample_kl": config.L, "pixel_nll": 1}
    backward = {f"{name}_backward": count for name, count in expected.items() if name != "lstm_gates"}
    backward["lstm_gates_backward"] = 2 * config.L  # generate has no backward
    assert dict(counter.custom) == ({} if custom_ops == "auto" else {**expected, **backward})


@pytest.mark.parametrize("share_cores", [False, True], ids=["unshared", "shared"])
def test_custom_ops_everywhere_match_reference(share_cores):
    """custom_ops="always" (the GPU's op structure, which bench/op_count.py counts): the gate and
    posterior ops on the CPU too, through their own PyTorch path and backward, the same function."""
    config = GQNConfig(representation="pool", L=2, z_dim=2, hidden=5, canvas=4, r_dim=8, share_cores=share_cores)
    with OpCounter() as counter:
        compare(config, batch=2, views=2, seed=3, custom_ops="always")
    # Only the fast model calls them: a gate op per cell and step (two in elbo, one in generate),
    # a posterior op per step of elbo.
    assert counter.custom["lstm_gates"] == 3 * config.L and counter.custom["posterior_sample_kl"] == config.L
