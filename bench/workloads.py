"""The workloads bench/run.py measures, each yielding result rows for every provider.

A row: workload, provider, mode, preset/size, batch, precision, time (median, 20/80), memory,
the analytic work (FLOPs or bytes) and how close that comes to the device's limits.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gqn_fast import GQN, GQNConfig
from gqn_fast import kernels
from gqn_fast.reference import GQN as ReferenceGQN
from gqn_fast.reference import transform_viewpoint

from measure import peak_memory_bytes, saved_for_backward_bytes, time_fn

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


def model_providers(device: torch.device, smoke: bool, quick: bool):
    """(name, model class, compile mode or None, CUDA-graph capture?, model attributes)."""
    providers = [
        ("reference-eager", ReferenceGQN, None, False, {}),
        ("reference-compile", ReferenceGQN, "default", False, {}),
        ("reference-compile-max-autotune", ReferenceGQN, "max-autotune", False, {}),
        ("gqn_fast-eager", GQN, None, False, {}),
        # The fused cells' contribution to the whole step: the same model with cuDNN convs
        # followed by the gate kernel, and with the fused cells' Triton backward convs.
        ("gqn_fast-unfused-cells-eager", GQN, None, False, {"fused_cells": False}),
        ("gqn_fast-triton-bwd-eager", GQN, None, False, {"backward_convs": "triton"}),
        ("gqn_fast-compile", GQN, "default", False, {}),
        ("gqn_fast-cudagraph", GQN, None, True, {}),
    ]
    if smoke or quick or device.type != "cuda":
        providers = [p for p in providers if p[2] != "max-autotune"]
    if device.type != "cuda":  # no CUDA graphs, and the cells run unfused whatever the switch
        providers = [p for p in providers if not p[3] and not p[4]]
    return providers


def compile_fn(fn, mode, smoke):
    # Smoke runs check the plumbing in seconds: aot_eager traces like inductor but skips codegen.
    if smoke:
        return torch.compile(fn, backend="aot_eager")
    return torch.compile(fn, mode=mode)


def make_train_step(model, batches, precision, device, compile_mode, smoke, cuda_graph):
    """A closure running one training step (forward, backward, Adam) on the next batch."""
    sigma = 0.7
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused, capturable=cuda_graph)
    elbo = model.elbo if compile_mode is None else compile_fn(model.elbo, compile_mode, smoke)
    cycle = itertools.cycle(batches)

    def step(batch):
        with autocast(device, precision):
            loss = elbo(*batch, sigma=sigma).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not cuda_graph)
        return loss

    if not cuda_graph:
        return lambda: step(next(cycle))
    # Capture the whole step once; replays read new inputs copied into the static batch.
    static = tuple(t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static)

    def replay():
        for dst, src in zip(static, next(cycle)):
            dst.copy_(src, non_blocking=True)
        graph.replay()

    return replay


def make_generate(model, batches, precision, device, compile_mode, smoke):
    generate = model.generate if compile_mode is None else compile_fn(model.generate, compile_mode, smoke)
    cycle = itertools.cycle(batches)

    def run():
        cx, cv, _, qv = next(cycle)
        with autocast(device, precision):
            return generate(cx, cv, qv)

    return run


def reference_flops(config: GQNConfig, batch, device, training: bool) -> int:
    """FLOPs of the reference's step, counted from its ops' shapes: the useful work, the same
    for every provider (the fast path does the same or less)."""
    model = ReferenceGQN(config).to(device)
    data = scene_batches(batch, device, count=1)[0]
    with FlopCounterMode(display=False) as counter:
        if training:
            model.elbo(*data, sigma=0.7).loss.backward()
        else:
            model.generate(data[0], data[1], data[3])
    return counter.get_total_flops()


def model_rows(presets, batch_sizes, precisions, device, smoke, quick, repeats, log):
    rows = []
    for preset, config in presets.items():
        for batch in batch_sizes[preset]:
            batches = scene_batches(batch, device)
            flops = {w: reference_flops(config, batch, device, w == "train_step") for w in ("train_step", "generate")}
            for precision in precisions:
                for name, cls, mode, graph, attributes in model_providers(device, smoke, quick):
                    for workload in ("train_step", "generate"):
                        if graph and workload == "generate":
                            continue
                        torch.manual_seed(0)
                        model = cls(config).to(device)
                        for attribute, value in attributes.items():
                            setattr(model, attribute, value)
                        label = f"{workload} {preset} B={batch} {precision} {name}"
                        try:
                            start = time.perf_counter()
                            if workload == "train_step":
                                fn = make_train_step(model, batches, precision, device, mode, smoke, graph)
                            else:
                                fn = make_generate(model, batches, precision, device, mode, smoke)
                            fn()
                            compile_s = time.perf_counter() - start if mode else None
                            timing = time_fn(fn, device, repeats=repeats)
                            peak = peak_memory_bytes(fn, device)
                            saved = None
                            if workload == "train_step" and not graph:
                                with autocast(device, precision):
                                    saved = saved_for_backward_bytes(
                                        lambda m=model: m.elbo(*batches[0], sigma=0.7)
                                    )
                        except Exception as error:  # one failing provider must not sink the run
                            log(f"  {label}: FAILED {type(error).__name__}: {error}")
                            rows.append(dict(workload=workload, provider=name, preset=preset, batch=batch,
                                             precision=precision, error=f"{type(error).__name__}: {error}"))
                            continue
                        row = dict(
                            workload=workload, provider=name, preset=preset, batch=batch,
                            precision=precision, mode="fwd+bwd+adam" if workload == "train_step" else "fwd",
                            median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                            peak_bytes=peak, saved_bytes=saved, compile_s=compile_s,
                            flops=flops[workload], TFLOPs=flops[workload] / timing.median_ms / 1e9,
                        )
                        log(f"  {label}: {timing.median_ms:.3f} ms")
                        rows.append(row)
                        del model, fn
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
            rows.append(dict(workload="representation", provider=name, preset=config.representation,
                             batch=batch, precision=precision, mode="fwd+bwd",
                             median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                             compile_s=compile_s, flops=flops,
                             TFLOPs=flops / timing.median_ms / 1e9))
    return rows


# --- kernel microbenchmarks -----------------------------------------------------------------


def eager_gates(preact, c):
    i, f, g, o = preact.float().chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c.float() + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c_new)).to(preact.dtype), c_new.to(preact.dtype)


def eager_sample_kl(mu_q, s_q, mu_p, s_p, eps):
    mu_q, s_q, mu_p, s_p = (t.float() for t in (mu_q, s_q, mu_p, s_p))
    sigma_q, sigma_p = F.softplus(s_q), F.softplus(s_p)
    kl = torch.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
    return (mu_q + sigma_q * eps).to(eps.dtype), kl.flatten(1).sum(1)


def eager_nll(x, logits, sigma):
    mean = torch.sigmoid(logits.float())
    nll = 0.5 * ((x.float() - mean) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


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
        yield ("conv_lstm_gates", B, eager_gates, kernels.conv_lstm_gates,
               lambda B=B: (randn(B, 512, 16, 16), randn(B, 128, 16, 16)),
               7 * n * elt, 12 * n * elt)
        m = B * 3 * 16 * 16  # z_dim = 3
        # fwd reads 5 tensors, writes z; bwd reads 5 and grad_z, writes 4 grads.
        yield ("gaussian_sample_kl", B, eager_sample_kl, kernels.gaussian_sample_kl,
               lambda B=B: tuple(randn(B, 3, 16, 16, grad=i < 4) for i in range(5)),
               6 * m * elt, 10 * m * elt)
        p = B * 3 * 64 * 64
        # fwd reads x and logits; bwd reads both again and writes grad_logits.
        yield ("gaussian_nll", B, lambda x, l: eager_nll(x, l, 0.7),
               lambda x, l: kernels.gaussian_nll(x, l, 0.7),
               lambda B=B: (torch.rand(B, 3, 64, 64, device=device, dtype=dtype), randn(B, 3, 64, 64)),
               2 * p * elt, 3 * p * elt)


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

                    try:
                        start = time.perf_counter()
                        run()
                        compile_s = time.perf_counter() - start if name == "compile" else None
                        timing = time_fn(run, device, repeats=repeats)
                    except Exception as error:
                        log(f"  {op} B={B} {name} {mode}: FAILED {type(error).__name__}: {error}")
                        rows.append(dict(workload=op, provider=name, mode=mode, batch=B,
                                         precision=str(dtype).split(".")[-1], error=str(error)))
                        continue
                    moved = fwd_bytes + (bwd_bytes if mode == "fwd+bwd" else 0)
                    gbps = moved / timing.median_ms / 1e6
                    log(f"  {op} B={B} {str(dtype)[6:]} {name} {mode}: {timing.median_ms:.4f} ms, {gbps:.0f} GB/s")
                    rows.append(dict(workload=op, provider=name, mode=mode, batch=B,
                                     precision=str(dtype).split(".")[-1], median_ms=timing.median_ms,
                                     p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, bytes=moved, GBps=gbps,
                                     share_of_copy_bw=gbps / copy_GBps, compile_s=compile_s))
    return rows


# --- one ConvLSTM cell: its 5x5 conv and gates, fused against unfused (issue: fused conv) ----


def eager_cell(x, weight, constant, c):
    return eager_gates(F.conv2d(x, weight, padding=2) + constant, c)


def unfused_cell(x, weight, constant, c):
    """gqn_fast's unfused path: cuDNN's conv, then the fused gate kernel."""
    preact = F.conv2d(x, weight, padding=2) + constant
    return kernels.conv_lstm_gates(preact.to(c.dtype), c)


def fused_cell(backward_convs):
    return lambda x, weight, constant, c: kernels.conv_gates(x, weight, constant, c, backward_convs=backward_convs)


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
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, flops=flops,
                       TFLOPs=tflops, compile_s=compile_s, share_of_peak=tflops / peak if peak else None)
            log(f"  {label}: {timing.median_ms:.4f} ms, {tflops:.1f} TFLOP/s")
            rows.append(row)
    return rows
