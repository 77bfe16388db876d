"""`python bench/run.py --smoke` runs on a CPU in seconds and writes well-formed results."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_well_formed_results(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    for key in ("device", "commit", "date", "torch", "triton", "cudnn.allow_tf32", "cuda.matmul.allow_tf32"):
        assert key in env
    assert results["limits"]["copy_GBps"] > 0
    rows = results["rows"]
    assert not [r for r in rows if "error" in r]
    workloads = {r["workload"] for r in rows}
    assert {"lstm_gates", "posterior_sample_kl", "pixel_nll", "train_step", "generate",
            "representation", "render", "loader", "conv_lstm_cell_generator", "conv_lstm_cell_inference"} <= workloads
    cell_providers = {r["provider"] for r in rows if r["workload"] == "conv_lstm_cell_inference"}
    assert {"eager", "cudnn+gate-kernel", "gqn_fast-fused-aten-bwd", "gqn_fast-fused-triton-bwd"} <= cell_providers
    providers = {r["provider"] for r in rows if r["workload"] == "train_step"}
    assert {"reference-eager", "reference-compile", "gqn_fast-eager", "gqn_fast-compile"} <= providers
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["device"] == env["device"]
    steps = [r for r in rows if r["workload"] == "train_step"]
    assert all(r["speedup"] > 0 and r["flops"] > 0 and r["saved_bytes"] > 0 for r in steps)
    # Eager providers' peak memory, measured in a fresh process on the CPU (at these tiny sizes
    # every block may come from malloc's already resident heap: 0 bytes of growth is possible).
    eager = [r for r in rows if r["workload"] in ("train_step", "generate") and r["provider"].endswith("-eager")]
    assert len(eager) == 4 and all(isinstance(r["peak_bytes"], int) and r["peak_bytes"] >= 0 for r in eager)
    assert "peak vs ref" in (out / "results.md").read_text()
    table = (out / "results.md").read_text()
    assert "| train_step |" in table and "gqn_fast-eager" in table
    for plot in ("speedup.png", "roofline.png"):
        with Image.open(out / plot) as image:
            assert image.width > 100 and image.height > 100
