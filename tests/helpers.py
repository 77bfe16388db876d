"""Comparisons shared by the tests: a scale-free error with per-dtype limits."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Relative RMS error limits, rms(ref - out) / rms(ref), per compute dtype.
RMS_LIMITS = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64; NaN anywhere makes it NaN (which fails every limit)."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {list(out.shape)} != reference {list(ref.shape)}")
    diff = (out - ref).pow(2).mean().sqrt()
    scale = ref.pow(2).mean().sqrt()
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("nan")
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def assert_close_rms(out, ref, limit, name="output"):
    err = rel_rms(out, ref)
    # `not err <= limit` so that NaN fails too.
    assert err <= limit, f"{name}: relative RMS error {err:.3g} exceeds {limit:.1g}"


def tiny_config(**overrides):
    """A GQN small enough for many hypothesis examples on a CPU."""
    from gqn_fast import GQNConfig

    values = dict(representation="tower", L=2, z_dim=2, hidden=8, canvas=8, r_dim=16)
    values.update(overrides)
    return GQNConfig(**values)


def random_scene_batch(batch, views, dtype=torch.float32, generator=None):
    """(context_x, context_v, query_x, query_v) with images in [0, 1] and 7-d viewpoints."""
    from gqn_fast.reference import transform_viewpoint

    g = generator
    context_x = torch.rand(batch, views, 3, 64, 64, generator=g, dtype=dtype)
    context_v = transform_viewpoint(torch.randn(batch, views, 5, generator=g, dtype=dtype))
    query_x = torch.rand(batch, 3, 64, 64, generator=g, dtype=dtype)
    query_v = transform_viewpoint(torch.randn(batch, 5, generator=g, dtype=dtype))
    return context_x, context_v, query_x, query_v


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (on a GPU: a wait for it)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def interrupt_when(argv, ready, env=None, timeout=120):
    """Runs `argv` in a process group of its own and, once `ready(process)` holds, sends SIGINT to
    the whole group, as a terminal's Ctrl-C does (workers included); returns (exit code, stdout,
    stderr) once it exits. Fails if it ends before it is ready, or if a process of its group
    (a worker) outlives it."""
    import os
    import signal
    import subprocess
    import time

    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready(process):
            assert process.poll() is None, ("ended before the Ctrl-C", process.communicate())
            assert time.monotonic() < deadline, "never got to the point of the Ctrl-C"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + 5
    while True:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "a process of the group outlived the Ctrl-C"
        time.sleep(0.05)
    return process.returncode, out, err


def ctrl_c_at_call(monkeypatch, owner, name: str, call: int) -> list:
    """A real SIGINT to this process at the `call`-th call of `owner.name` (made before it runs):
    a Ctrl-C in the middle of the work. Returns the list that counts the calls."""
    import os
    import signal

    real, calls = getattr(owner, name), []

    def signalled(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)
    return calls


def ctrl_c_at_module_call(monkeypatch, call: int) -> None:
    """A Ctrl-C at the `call`-th call of any torch module (a layer of the model at work)."""
    ctrl_c_at_call(monkeypatch, torch.nn.Module, "__call__", call)


def assert_state_dicts_load_both_ways(reference, fast):
    """The two models name their parameters alike, and each loads the other's state_dict exactly."""
    assert list(reference.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(reference.state_dict())
    reference.load_state_dict(fast.state_dict())
    for (name, a), b in zip(reference.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name


def shapes_saved_for_backward(model, inputs, sigma=0.7) -> list[tuple]:
    """The shapes of the tensors autograd saves for the backward of model.elbo(*inputs) (run)."""
    saved = []
    pack = lambda t: saved.append(tuple(t.shape)) or t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.elbo(*inputs, sigma=sigma).loss.backward()
    return saved


def is_canvas(shape, canvas: int) -> bool:
    """A [N, canvas, 64, 64] tensor."""
    return len(shape) == 4 and shape[1] == canvas and shape[-2:] == (64, 64)


def outputs_and_gradients(model, inputs, noise, sigma):
    """[(label, tensor)] for every ELBO output, every gradient of the loss (parameters and the four
    inputs), and generate's images."""
    out = model.elbo(*inputs, sigma=sigma, noise=noise)
    params = dict(model.named_parameters())
    wrt = list(params.values()) + inputs
    grads = torch.autograd.grad(out.loss, wrt, allow_unused=True)
    labels = list(params) + ["context_x", "context_v", "query_x", "query_v"]
    # A parameter the computation never touches has a zero gradient.
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
    context_x, context_v, _, query_v = (t.detach() for t in inputs)
    image = model.generate(context_x, context_v, query_v, noise=noise)
    results = [(name, getattr(out, name)) for name in ["loss", "nll", "kl", "mean"]]
    return results + [(f"grad {n}", g) for n, g in zip(labels, grads)] + [("generate", image)]


def compare_with_reference(reference_cls, fast_cls, config, make_data, seed, dtype, sigma, device, **choices):
    """Every output and every gradient of fast_cls(config, **choices) (in dtype, on device) against
    reference_cls in float64 (on the CPU), same weights, same data (make_data(): the four float64
    inputs) and noise. Limit: the dtype's, or 4x the plain reference's own error in that dtype and
    place (it runs beside fast; in float64 it is the oracle)."""
    torch.manual_seed(seed)
    oracle = reference_cls(config).double()
    plain = reference_cls(config).to(device, dtype)
    fast = fast_cls(config, **choices).to(device, dtype)
    plain.load_state_dict(oracle.state_dict())
    fast.load_state_dict(oracle.state_dict())
    data = make_data()
    noise = torch.randn(config.L, data[0].shape[0], config.z_dim, 16, 16, dtype=torch.float64)

    def run(model, dt, where="cpu"):
        inputs = [t.to(where, dt).requires_grad_() for t in data]
        return outputs_and_gradients(model, inputs, noise.to(where, dt), sigma)

    expected = run(oracle, torch.float64)
    plain_results = expected if dtype == torch.float64 and device == "cpu" else run(plain, dtype, device)
    for (label, want), (_, plain_got), (_, got) in zip(expected, plain_results, run(fast, dtype, device)):
        limit = max(RMS_LIMITS[dtype], 4 * rel_rms(plain_got, want))
        assert_close_rms(got, want, limit, label)
