"""How bench/run.py measures: times with a 20/80 band, memory, and the device's own limits."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

# Nominal dense peaks (no sparsity) by device-name fragment: (bf16 TFLOP/s, tf32 TFLOP/s, HBM GB/s).
NOMINAL_PEAKS = {
    "H200": (989.0, 494.0, 4800.0),
    "H100 SXM": (989.0, 494.0, 3350.0),
    "H100 80GB HBM3": (989.0, 494.0, 3350.0),
    "H100 PCIe": (756.0, 378.0, 2000.0),
    "H100": (989.0, 494.0, 3350.0),
    "A100": (312.0, 156.0, 2039.0),
}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> Timing:
    """Median and 20/80 quantiles of fn's run time.

    On CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs); elsewhere
    perf_counter around each call.
    """
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=max(25, warmup), rep=max(100, repeats * 10), quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(median, p20, p80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return _summary(samples)


def _summary(samples: list[float]) -> Timing:
    quantiles = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return Timing(statistics.median(samples), quantiles[1], quantiles[7])


def interleaved_times(fns: dict, device: torch.device, repeats: int = 10, warmup: int = 2) -> dict:
    """{name: Timing}: each fn runs once per round, in turn, for `repeats` rounds, so a
    change in clocks or in the machine's load falls on every provider alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(times) for name, times in samples.items()}


def peak_memory_bytes(fn, device: torch.device) -> int | None:
    """Peak device memory allocated while fn runs, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes(fn) -> int | None:
    """Peak resident set while fn runs, above the resident set before it (Linux; else None).

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return _status_bytes("VmHWM") - before


def saved_for_backward_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn runs forward (any device).

    The dominant share of training memory, and measurable on a CPU, where no allocator
    reports peaks. Tensors saved twice count twice (an upper bound)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measured_limits(device: torch.device, quick: bool) -> dict:
    """Device-to-device copy bandwidth (GB/s) and matrix-product rates (TFLOP/s), measured now."""
    numel = (2**26 if device.type == "cuda" else 2**22) // (4 if quick else 1)
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, repeats=10)
    limits = {"copy_GBps": 2 * src.numel() * 4 / copy.median_ms / 1e6}
    n = 8192 if device.type == "cuda" else 512
    n = n // 2 if quick else n
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = time_fn(lambda: a @ b, device, repeats=10)
        limits[f"matmul_{str(dtype).split('.')[-1]}_TFLOPs"] = 2 * n**3 / t.median_ms / 1e9
    return limits


def nominal_peaks(device_name: str) -> dict:
    for fragment, (bf16, tf32, hbm) in NOMINAL_PEAKS.items():
        if fragment in device_name:
            return {"nominal_bf16_TFLOPs": bf16, "nominal_tf32_TFLOPs": tf32, "nominal_HBM_GBps": hbm}
    return {}
