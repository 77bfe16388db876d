"""The workloads bench/run.py measures, each yielding result rows for every provider.

A row: workload, provider, mode, preset/size, batch, precision, time (median, 20/80), memory,
the analytic work (FLOPs or bytes) and how close that comes to the device's limits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as the peak-memory child process

from gqn_fast.kernels.gates import lstm_gates_torch
from gqn_fast.kernels.gaussian import posterior_sample_kl_torch
from gqn_fast.kernels.pixel_likelihood import pixel_nll_torch
from gqn_fast.reference import GQN as ReferenceGQN
from gqn_fast.reference import transform_viewpoint
from measure import (
    interleaved_times,
    peak_memory_bytes,
    peak_rss_bytes,
    saved_for_backward_bytes,
    time_fn,
)
from op_count import count_training_step, on_gpu_branches

from gqn_fast import GQNConfig, kernels
from gqn_fast.data.loader import Batch
from gqn_fast.malloc import limit_malloc_caching
from gqn_fast.model import compile_options
from gqn_fast.models import build_model
from gqn_fast.models import model_class as class_of
from gqn_fast.schedules import learning_rate, pixel_sigma
from gqn_fast.train_step import TrainStep
from gqn_fast.train_step import make_optimizer as make_step_optimizer

CONTEXT_VIEWS = 3
ROTATING_BATCHES = 3  # distinct inputs cycled through, so no run reuses a cached input


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def scene_batches(batch: int, device: torch.device, count: int = ROTATING_BATCHES):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        cx = torch.rand(batch, CONTEXT_VIEWS, 3, 64, 64, generator=g)
        cv = transform_viewpoint(torch.randn(batch, CONTEXT_VIEWS, 5, generator=g))
        qx = torch.rand(batch, 3, 64, 64, generator=g)
        qv = transform_viewpoint(torch.randn(batch, 5, generator=g))
        out.append(tuple(t.to(device) for t in (cx, cv, qx, qv)))
    return out


# --- whole-model workloads ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way of running a whole model in the bench: which implementation, compiled or not,
    replayed from CUDA graphs or not, with which constructor choices (gqn_fast.GQN's)."""

    name: str
    implementation: str  # "reference" or "gqn_fast": a key of IMPLEMENTATIONS
    compile_mode: str | None = None
    cuda_graph: bool = False
    choices: tuple = ()  # (name, value) pairs for the model's constructor

    def model_class(self, config):
        return model_class(self.implementation, config)

    def build(self, config):
        return self.model_class(config)(config, **dict(self.choices))

    def applies_to(self, config) -> bool:
        """Whether config's model takes this provider's choices (fused_cells is GQN's alone)."""
        parameters = inspect.signature(self.model_class(config)).parameters
        return all(name in parameters for name, _ in self.choices)


def model_providers(device: torch.device, smoke: bool, quick: bool, only=None) -> list[Provider]:
    """The providers that apply here; only: the names to keep (None: all that apply here)."""
    providers = [
        Provider("reference-eager", "reference"),
        Provider("reference-compile", "reference", "default"),
        Provider("reference-compile-max-autotune", "reference", "max-autotune"),
        Provider("gqn_fast-eager", "gqn_fast"),
        # The fused conv + gates cells in the whole step (the default is cuDNN's conv, then the
        # gate kernel), with cuDNN's or the fused cells' Triton backward convs.
        Provider("gqn_fast-fused-cells-eager", "gqn_fast", choices=(("fused_cells", True),)),
        Provider(
            "gqn_fast-fused-cells-triton-bwd-eager",
            "gqn_fast",
            choices=(("fused_cells", True), ("backward_convs", "triton")),
        ),
        Provider("gqn_fast-compile", "gqn_fast", "default"),
        Provider("gqn_fast-cudagraph", "gqn_fast", cuda_graph=True),
        # The fair baseline for what the algebra and the kernels add: a user can graph the reference too.
        Provider("reference-cudagraph", "reference", cuda_graph=True),
    ]
    if smoke or quick or device.type != "cuda":
        providers = [p for p in providers if p.compile_mode != "max-autotune"]
    if device.type != "cuda":  # no CUDA graphs, and the cells run unfused whatever the choice
        providers = [p for p in providers if not p.cuda_graph and not p.choices]
    return [p for p in providers if only is None or p.name in only]


def compile_fn(fn, mode, smoke, options=None):
    """torch.compile(fn) in `mode`, or with inductor `options` (a model's own, gqn_fast.model.compile_options)."""
    # Smoke runs check the plumbing in seconds: aot_eager traces like inductor but skips codegen.
    if smoke:
        return torch.compile(fn, backend="aot_eager")
    if options:
        return torch.compile(fn, options={**options, "max_autotune": mode == "max-autotune"})
    return torch.compile(fn, mode=mode)


def make_optimizer(model, device, cuda_graph=False):
    # The same Adam for every provider, and the one `gqn-fast train` uses (gqn_fast.train_step).
    return make_step_optimizer(model, device, 1e-4, graphed=cuda_graph)


def loader_batches(batches):
    """The float batches as the loader gives them to `gqn-fast train`: uint8 images and float32
    viewpoints on the host (pinned where a GPU can copy from it without waiting)."""
    pin = torch.cuda.is_available()

    def host(t, image):
        t = (t * 255).round().to(torch.uint8) if image else t.float()
        t = t.cpu()
        return t.pin_memory() if pin else t

    return [Batch(host(cx, True), host(cv, False), host(qx, True), host(qv, False)) for cx, cv, qx, qv in batches]


def make_train_step(model, optimizer, batches, precision, device, compile_mode, smoke, cuda_graph):
    """A closure running one training step as `gqn-fast train` runs it (gqn_fast.train_step:
    the batch to the device, forward, backward, Adam), with sigma and the learning rate annealed
    along the paper's schedules as training does; replayed from CUDA graphs with `cuda_graph`."""
    elbo = model if compile_mode is None else compile_fn(model, compile_mode, smoke, compile_options(model))
    step = TrainStep(model, optimizer, device, precision, "graphed" if cuda_graph else "eager", elbo=elbo)
    cycle = itertools.cycle(loader_batches(batches))
    counter = itertools.count()

    def run():
        k = next(counter)
        return step(next(cycle), pixel_sigma(k, 200_000), learning_rate(k))

    if cuda_graph:  # capture now (the first call of a context size runs it eagerly, then captures)
        run()
    return run


def make_generate(model, batches, precision, device, compile_mode, smoke):
    generate = (
        model.generate
        if compile_mode is None
        else compile_fn(model.generate, compile_mode, smoke, compile_options(model))
    )
    cycle = itertools.cycle(batches)

    def run():
        cx, cv, _, qv = next(cycle)
        with autocast(device, precision):
            return generate(cx, cv, qv)

    return run


def reference_flops(config: GQNConfig, batch, device, training: bool) -> int:
    """FLOPs of the reference's step, counted from its ops' shapes: the useful work, the same
    for every provider (the fast path does the same or less)."""
    model = build_model(config, "reference").to(device)
    data = scene_batches(batch, device, count=1)[0]
    with FlopCounterMode(display=False) as counter:
        if training:
            model.elbo(*data, sigma=0.7).loss.backward()
        else:
            model.generate(data[0], data[1], data[3])
    return counter.get_total_flops()


# The bench's names of the two implementations -> gqn_fast.models' (which, with the config's model
# kind, pick the class: GQN or one of its successors).
IMPLEMENTATIONS = {"reference": "reference", "gqn_fast": "fast"}


def model_class(implementation: str, config: GQNConfig) -> type:
    return class_of(config, IMPLEMENTATIONS[implementation])


WORKLOADS = ("train_step", "generate")


def _eager_workload(model: str, config: GQNConfig, batch: int, precision: str, workload: str, device):
    torch.manual_seed(0)
    net = model_class(model, config)(config).to(device)
    batches = scene_batches(batch, device)
    if workload == "train_step":
        return make_train_step(net, make_optimizer(net, device), batches, precision, device, None, False, False)
    return make_generate(net, batches, precision, device, None, False)


def eager_peak_memory(config: GQNConfig, batch: int, precision: str, device) -> dict:
    """{(model, workload): bytes}: the peak memory of one eager training step or generation of
    each model above what was live just before it (after a first call, which allocates the
    optimizer's state).

    CUDA: the caching allocator's peak, in this process. CPU: the peak resident set, in a fresh
    process (_peak_rss_child) where no other provider's models, compiled graphs or cached
    blocks are resident; the values are None where /proc is missing."""
    if device.type == "cuda":
        peaks = {}
        for model, workload in itertools.product(IMPLEMENTATIONS, WORKLOADS):
            fn = _eager_workload(model, config, batch, precision, workload, device)
            fn()
            peaks[model, workload] = peak_memory_bytes(fn, device)
            del fn
        return peaks
    peaks = {}
    for model, workload in itertools.product(IMPLEMENTATIONS, WORKLOADS):
        # One process per measurement: one measured after another would see the heap the first
        # left behind (about 1 MiB in 700 at the paper preset).
        spec = dict(config=config.to_dict(), batch=batch, precision=precision, model=model, workload=workload)
        child = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"peak-memory process failed: {child.stderr[-2000:]}")
        peaks[model, workload] = json.loads(child.stdout.strip().splitlines()[-1])
    return peaks


def _peak_rss_child(spec: dict) -> None:
    """eager_peak_memory's process on a CPU: one model and workload, built, called once, then
    measured (peak RSS over the RSS before the call)."""
    limit_malloc_caching()
    fn = _eager_workload(
        spec["model"],
        GQNConfig.from_dict(spec["config"]),
        spec["batch"],
        spec["precision"],
        spec["workload"],
        torch.device("cpu"),
    )
    fn()
    print(json.dumps(peak_rss_bytes(fn)))


def model_rows(cases, precisions, device, smoke, quick, repeats, log, only=None):
    """cases: [(preset label, GQNConfig, batch)]. For each case, precision and workload, every
    provider is built and warmed (compiled) first, then all are timed interleaved; eager
    providers also get their peak memory, compiled ones share their model (and optimizer)
    with the eager one of the same class."""
    rows = []
    for preset, config, batch in cases:
        batches = scene_batches(batch, device)
        flops = {w: reference_flops(config, batch, device, w == "train_step") for w in ("train_step", "generate")}
        peaks, host_ops = {}, {}
        providers = [p for p in model_providers(device, smoke, quick, only) if p.applies_to(config)]
        for precision, workload in itertools.product(precisions, WORKLOADS):
            models, fns, compile_s, errors = {}, {}, {}, {}
            for provider in providers:
                name, mode, graph = provider.name, provider.compile_mode, provider.cuda_graph
                if graph and workload == "generate":
                    continue
                label = f"{workload} {preset} B={batch} {precision} {name}"
                try:
                    # Compiled providers share the model (and optimizer) of the eager one of their kind.
                    key = (provider.implementation, graph, provider.choices)
                    if key not in models:
                        torch.manual_seed(0)
                        model = provider.build(config).to(device)
                        models[key] = model, make_optimizer(model, device, graph)
                    model, optimizer = models[key]
                    start = time.perf_counter()
                    if workload == "train_step":
                        fn = make_train_step(model, optimizer, batches, precision, device, mode, smoke, graph)
                    else:
                        fn = make_generate(model, batches, precision, device, mode, smoke)
                    fn()
                    compile_s[name] = time.perf_counter() - start if mode else None
                    fns[name] = fn
                except Exception as error:  # one failing provider must not sink the run
                    log(f"  {label}: FAILED {type(error).__name__}: {error}")
                    errors[name] = f"{type(error).__name__}: {error}"
            if device.type == "cuda":  # CUDA events time each alone, with L2 flushed
                timings = {name: time_fn(fn, device, repeats=repeats) for name, fn in fns.items()}
            else:
                timings = interleaved_times(fns, device, repeats=repeats, warmup=1)
            for provider in providers:
                name, mode, graph = provider.name, provider.compile_mode, provider.cuda_graph
                if graph and workload == "generate":
                    continue
                row = dict(
                    workload=workload,
                    provider=name,
                    preset=preset,
                    batch=batch,
                    precision=precision,
                    mode="fwd+bwd+adam" if workload == "train_step" else "fwd",
                )
                if name in errors:
                    rows.append(dict(row, error=errors[name]))
                    continue
                try:
                    peak = saved = None
                    if mode is None and not graph and not provider.choices:
                        if precision not in peaks:
                            peaks[precision] = eager_peak_memory(config, batch, precision, device)
                        peak = peaks[precision][provider.implementation, workload]
                    if workload == "train_step" and not graph:
                        model = models[(provider.implementation, graph, provider.choices)][0]
                        with autocast(device, precision):
                            saved = saved_for_backward_bytes(lambda m=model: m.elbo(*batches[0], sigma=0.7))
                except Exception as error:
                    log(f"  {workload} {preset} {name}: memory FAILED {type(error).__name__}: {error}")
                    rows.append(dict(row, error=f"{type(error).__name__}: {error}"))
                    continue
                timing = timings[name]
                row.update(
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    peak_bytes=peak,
                    saved_bytes=saved,
                    compile_s=compile_s[name],
                    flops=flops[workload],
                    TFLOPs=flops[workload] / timing.median_ms / 1e9,
                )
                if workload == "train_step" and mode is None and not graph:
                    # What an eager step asks of the host (bench/op_count.py: counted on the meta
                    # device for the GPU's branches, the fp32 graph).
                    if name not in host_ops:
                        model = on_gpu_branches(provider.model_class(config), config, **dict(provider.choices))
                        host_ops[name] = count_training_step(model, batch)
                    counts = host_ops[name]
                    row.update(
                        ops_per_step=counts["ops"] + counts["custom ops"],
                        views_per_step=counts["views"],
                        autograd_nodes=counts["autograd nodes"],
                    )
                memory = "" if peak is None else f", peak {peak / 2**20:.0f} MiB"
                log(f"  {workload} {preset} B={batch} {precision} {name}: {timing.median_ms:.1f} ms{memory}")
                rows.append(row)
            del models, fns
    return rows


def representation_rows(config, batch, precisions, device, smoke, repeats, log):
    rows = []
    data = scene_batches(batch, device, count=1)[0]
    x, v = data[0].flatten(0, 1), data[1].flatten(0, 1)
    for precision in precisions:
        for name, mode in [("eager", None), ("compile", "default")]:
            net = ReferenceGQN(config).representation.to(device)
            fn_net = net if mode is None else compile_fn(net, mode, smoke)

            def run():
                with autocast(device, precision):
                    fn_net(x, v).sum().backward()

            start = time.perf_counter()
            run()
            compile_s = time.perf_counter() - start if mode else None
            timing = time_fn(run, device, repeats=repeats)
            with FlopCounterMode(display=False) as counter:
                net(x, v).sum().backward()
            flops = counter.get_total_flops()
            log(f"  representation {config.representation} {precision} {name}: {timing.median_ms:.3f} ms")
            rows.append(
                dict(
                    workload="representation",
                    provider=name,
                    preset=config.representation,
                    batch=batch,
                    precision=precision,
                    mode="fwd+bwd",
                    median_ms=timing.median_ms,
                    p20_ms=timing.p20_ms,
                    p80_ms=timing.p80_ms,
                    compile_s=compile_s,
                    flops=flops,
                    TFLOPs=flops / timing.median_ms / 1e9,
                )
            )
    return rows


# --- kernel microbenchmarks -----------------------------------------------------------------


# The eager baselines are the ops' own PyTorch forms (their CPU paths), run by autograd.
eager_gates = lstm_gates_torch


def eager_sample_kl(mu_q, s_q, mu_p, s_p, eps):
    return posterior_sample_kl_torch(mu_q, s_q, mu_p, s_p, eps)


def eager_nll(x, logits, sigma):
    return pixel_nll_torch(x, logits, torch.tensor(float(sigma), dtype=torch.float64, device=logits.device))


def kernel_cases(device, dtype, sizes):
    """(op name, batch, eager fn, ours, input maker, bytes forward, bytes backward) per size.

    Bytes are the least any implementation must move: each input read and output written once.
    """
    elt = torch.tensor([], dtype=dtype).element_size()

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    for B in sizes:
        n = B * 128 * 16 * 16  # H = 128 on the 16x16 grid
        # fwd reads preact (4n) and c, writes h and c_new; bwd reads preact, c and two grads,
        # writes grad_preact (4n) and grad_c.
        yield (
            "lstm_gates",
            B,
            eager_gates,
            kernels.lstm_gates,
            lambda B=B: (randn(B, 512, 16, 16), randn(B, 128, 16, 16)),
            7 * n * elt,
            12 * n * elt,
        )
        m = B * 3 * 16 * 16  # z_dim = 3
        # fwd reads 5 tensors, writes z; bwd reads 5 and grad_z, writes 4 grads.
        yield (
            "posterior_sample_kl",
            B,
            eager_sample_kl,
            kernels.posterior_sample_kl,
            lambda B=B: tuple(randn(B, 3, 16, 16, grad=i < 4) for i in range(5)),
            6 * m * elt,
            10 * m * elt,
        )
        p = B * 3 * 64 * 64
        # fwd reads x and logits; bwd reads both again and writes grad_logits.
        yield (
            "pixel_nll",
            B,
            lambda x, logits: eager_nll(x, logits, 0.7),
            lambda x, logits: kernels.pixel_nll(x, logits, 0.7),
            lambda B=B: (torch.rand(B, 3, 64, 64, device=device, dtype=dtype), randn(B, 3, 64, 64)),
            2 * p * elt,
            3 * p * elt,
        )


def kernel_rows(device, dtypes, sizes, smoke, repeats, copy_GBps, log):
    rows = []
    for dtype in dtypes:
        for op, B, eager, ours, make, fwd_bytes, bwd_bytes in kernel_cases(device, dtype, sizes):
            inputs = [make() for _ in range(ROTATING_BATCHES)]
            providers = [("eager", eager), ("compile", compile_fn(eager, "default", smoke)), ("gqn_fast", ours)]
            for name, fn in providers:
                for mode in ("fwd", "fwd+bwd"):
                    cycle = itertools.cycle(inputs)

                    def run(fn=fn, mode=mode, cycle=cycle):
                        out = fn(*next(cycle))
                        if mode == "fwd+bwd":
                            outs = out if isinstance(out, tuple) else (out,)
                            torch.autograd.backward([o.float().sum() for o in outs])

                    what = dict(workload=op, provider=name, mode=mode, batch=B, precision=str(dtype).split(".")[-1])
                    try:
                        start = time.perf_counter()
                        run()
                        compile_s = time.perf_counter() - start if name == "compile" else None
                        timing = time_fn(run, device, repeats=repeats)
                    except Exception as error:
                        log(f"  {op} B={B} {name} {mode}: FAILED {type(error).__name__}: {error}")
                        rows.append(dict(what, error=str(error)))
                        continue
                    moved = fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)
                    gbps = moved / timing.median_ms / 1e6
                    log(f"  {op} B={B} {str(dtype)[6:]} {name} {mode}: {timing.median_ms:.4f} ms, {gbps:.0f} GB/s")
                    rows.append(
                        dict(
                            what,
                            median_ms=timing.median_ms,
                            p20_ms=timing.p20_ms,
                            p80_ms=timing.p80_ms,
                            bytes=moved,
                            GBps=gbps,
                            share_of_copy_bw=gbps / copy_GBps,
                            compile_s=compile_s,
                        )
                    )
    return rows


# --- one ConvLSTM cell: its 5x5 conv and gates, fused against unfused (issue: fused conv) ----


def eager_cell(x, weight, constant, c):
    return eager_gates(F.conv2d(x, weight, padding=2) + constant, c)


def unfused_cell(x, weight, constant, c):
    """gqn_fast's default cell: cuDNN's conv, then the gate kernel, which adds the constant in its
    own pass (as gqn_fast.GQN._gates)."""
    return kernels.lstm_gates(F.conv2d(x, weight, padding=2), c, constant)


def fused_cell(backward_convs, gates_in_one_dot=False):
    """kernels.conv_lstm_cell with the given backward convs and forward GEMM shape."""

    def cell(x, weight, constant, c):
        return kernels.conv_lstm_cell(
            x, weight, constant, c, backward_convs=backward_convs, gates_in_one_dot=gates_in_one_dot
        )

    return cell


# (core, step-varying input channels) at the paper's sizes: the generator reads z and h_g,
# the inference core h_g, the canvas view and h_e (their constant inputs are hoisted).
CELL_SHAPES = {"generator": 3 + 128, "inference": 3 * 128}


def conv_cell_rows(device, dtypes, batches, smoke, repeats, peaks, log):
    """The cell's step-varying 5x5 conv plus gates, every provider, fwd and fwd+bwd.

    x and weight take the operand dtype (as autocast gives them), constant and c are fp32 as
    in the model. TFLOP/s counts the conv's multiply-adds (x2); share_of_peak is against the
    chip's nominal dense tensor-core rate (TF32 for fp32 operands)."""
    hidden = 8 if smoke else 128
    providers = [
        ("eager", eager_cell),
        ("compile", compile_fn(eager_cell, "default", smoke)),
        ("cudnn+gate-kernel", unfused_cell),
        ("gqn_fast-fused-aten-bwd", fused_cell("aten")),
        ("gqn_fast-fused-triton-bwd", fused_cell("triton")),
        ("gqn_fast-fused-one-dot-aten-bwd", fused_cell("aten", gates_in_one_dot=True)),
    ]
    rows = []
    for dtype, batch, (core, cin) in itertools.product(dtypes, batches, CELL_SHAPES.items()):
        cin = min(cin, 3 * hidden)
        precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        peak = peaks.get("nominal_bf16_TFLOPs" if precision == "bf16" else "nominal_tf32_TFLOPs")

        def make():
            x = torch.randn(batch, cin, 16, 16, device=device, dtype=dtype, requires_grad=True)
            weight = (torch.randn(4 * hidden, cin, 5, 5, device=device) / (25 * cin) ** 0.5).to(dtype)
            constant = torch.randn(batch, 4 * hidden, 16, 16, device=device, requires_grad=True)
            c = torch.randn(batch, hidden, 16, 16, device=device, requires_grad=True)
            return x, weight.requires_grad_(), constant, c

        inputs = [make() for _ in range(ROTATING_BATCHES)]
        conv_flops = 2 * batch * 16 * 16 * cin * 25 * 4 * hidden
        for (name, fn), mode in itertools.product(providers, ("fwd", "fwd+bwd")):
            cycle = itertools.cycle(inputs)

            def run(fn=fn, mode=mode, cycle=cycle):
                h, c_new = fn(*next(cycle))
                if mode == "fwd+bwd":
                    torch.autograd.backward([h.float().sum(), c_new.float().sum()])

            label = f"conv_lstm_cell {core} B={batch} {precision} {name} {mode}"
            row = dict(workload=f"conv_lstm_cell_{core}", provider=name, mode=mode, batch=batch, precision=precision)
            try:
                start = time.perf_counter()
                run()
                compile_s = time.perf_counter() - start if name == "compile" else None
                timing = time_fn(run, device, repeats=repeats)
            except Exception as error:  # one failing provider must not sink the run
                log(f"  {label}: FAILED {type(error).__name__}: {error}")
                rows.append(dict(row, error=f"{type(error).__name__}: {error}"))
                continue
            flops = conv_flops * (3 if mode == "fwd+bwd" else 1)  # backward: input and weight grads
            tflops = flops / timing.median_ms / 1e9
            row.update(
                median_ms=timing.median_ms,
                p20_ms=timing.p20_ms,
                p80_ms=timing.p80_ms,
                flops=flops,
                TFLOPs=tflops,
                compile_s=compile_s,
                share_of_peak=tflops / peak if peak else None,
            )
            log(f"  {label}: {timing.median_ms:.4f} ms, {tflops:.1f} TFLOP/s")
            rows.append(row)
    return rows


# --- gqn_fast.nn.ConvLSTM against the module it replaces (issue 15) -----------------------


class PlainConvLSTMCell(torch.nn.Module):
    """The replaced module's cell (ndrplz/ConvLSTM_pytorch), from its equations: one conv over
    [x, h], gates split i, f, o, g."""

    def __init__(self, input_dim, hidden_dim, kernel_size):
        super().__init__()
        self.hidden_dim = hidden_dim
        padding = (kernel_size[0] // 2, kernel_size[1] // 2)
        self.conv = torch.nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size, padding=padding)

    def forward(self, x, h, c):
        i, f, o, g = torch.split(self.conv(torch.cat([x, h], dim=1)), self.hidden_dim, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class PlainConvLSTM(torch.nn.Module):
    """Batch-first, zero initial state, the last layer's outputs: the replaced module's forward."""

    def __init__(self, input_dim, hidden_dim, kernel_size, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_layers
        self.cell_list = torch.nn.ModuleList(
            PlainConvLSTMCell(dims[i], dims[i + 1], kernel_size) for i in range(num_layers)
        )

    def forward(self, x):
        for cell in self.cell_list:
            h = c = x.new_zeros(x.shape[0], cell.hidden_dim, *x.shape[3:])
            hs = []
            for t in range(x.shape[1]):
                h, c = cell(x[:, t], h, c)
                hs.append(h)
            x = torch.stack(hs, dim=1)
        return x


# name: (batch, steps, input channels, image side, hidden, kernel side, layers) as the issue
# sets them, and scaled down for a CPU (a 2-core machine takes seconds per full-size step).
CONVLSTM_SIZES = {
    "gpu": {"moving_mnist": (16, 10, 1, 64, 64, 3, 2), "nowcasting": (4, 10, 1, 100, 64, 5, 3)},
    "cpu": {"moving_mnist": (4, 10, 1, 32, 16, 3, 2), "nowcasting": (2, 10, 1, 50, 16, 5, 3)},
    "smoke": {"moving_mnist": (1, 2, 1, 8, 4, 3, 2)},  # the plumbing only, in seconds
}


def convlstm_rows(device, smoke, repeats, log):
    """gqn_fast.nn.ConvLSTM (a state_dict loaded from the plain module) against the plain module,
    each eager and compiled, forward (no grad) and forward+backward, timed interleaved."""
    from measure import interleaved_times

    from gqn_fast.nn import ConvLSTM

    sizes = CONVLSTM_SIZES["smoke" if smoke else "gpu" if device.type == "cuda" else "cpu"]
    rows = []
    for name, (batch, steps, cin, side, hidden, k, layers) in sizes.items():
        torch.manual_seed(0)
        plain = PlainConvLSTM(cin, hidden, (k, k), layers).to(device)
        ours = ConvLSTM(cin, hidden, (k, k), layers, batch_first=True).to(device)
        ours.load_state_dict(plain.state_dict())
        models = {
            "eager": plain,
            "compile": compile_fn(plain, "default", smoke),
            "gqn_fast-eager": lambda x: ours(x)[0][0],
            "gqn_fast-compile": compile_fn(lambda x: ours(x)[0][0], "default", smoke),
        }
        frames = [torch.randn(batch, steps, cin, side, side, device=device) for _ in range(ROTATING_BATCHES)]
        # Multiply-adds of every step's conv over [x, h], x2; the backward does two more convs.
        conv_flops = sum(2 * batch * side * side * ((cin if i == 0 else hidden) + hidden) * k * k * 4 * hidden
                         for i in range(layers)) * steps  # fmt: skip
        for mode in ("fwd", "fwd+bwd"):
            cycle = itertools.cycle(frames)

            def runner(model, mode=mode, cycle=cycle):
                def run():
                    if mode == "fwd":
                        with torch.no_grad():
                            model(next(cycle))
                    else:
                        model(next(cycle)).mean().backward()

                return run

            fns, compile_s, errors = {}, {}, {}
            for provider, model in models.items():
                start = time.perf_counter()
                try:
                    runner(model)()  # compiles here, outside the timing
                except Exception as error:  # one failing provider must not sink the run
                    errors[provider] = f"{type(error).__name__}: {error}"
                    log(f"  convlstm {name} {provider} {mode}: FAILED {errors[provider]}")
                    continue
                compile_s[provider] = time.perf_counter() - start if "compile" in provider else None
                fns[provider] = runner(model)
            timings = interleaved_times(fns, device, repeats=repeats)
            flops = conv_flops * (3 if mode == "fwd+bwd" else 1)
            for provider in models:
                row = dict(workload=f"convlstm_{name}", provider=provider, mode=mode, batch=batch, precision="fp32",
                           size=f"T={steps} {side}x{side} hidden={hidden} k={k}x{k} layers={layers}")  # fmt: skip
                if provider in errors:
                    rows.append(dict(row, error=errors[provider]))
                    continue
                timing = timings[provider]
                row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, flops=flops,
                           TFLOPs=flops / timing.median_ms / 1e9, compile_s=compile_s[provider])  # fmt: skip
                rows.append(row)
            base = {p: timings[p].median_ms for p in ("eager", "compile") if p in timings}
            for provider, timing in timings.items():
                ratios = ", ".join(f"{base[p] / timing.median_ms:.2f}x {p}" for p in base)
                log(f"  convlstm {name} B={batch} {provider} {mode}: {timing.median_ms:.2f} ms ({ratios})")
    return rows


if __name__ == "__main__":
    _peak_rss_child(json.loads(sys.argv[1]))
