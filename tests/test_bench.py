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
        capture_output=True,
        text=True,
        cwd=tmp_path,
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
    assert {
        "lstm_gates",
        "posterior_sample_kl",
        "pixel_nll",
        "train_step",
        "generate",
        "representation",
        "render",
        "loader",
        "feed",
        "feed-parts",
        "conv_lstm_cell_generator",
        "conv_lstm_cell_inference",
    } <= workloads
    cell_providers = {r["provider"] for r in rows if r["workload"] == "conv_lstm_cell_inference"}
    assert {
        "eager",
        "cudnn+gate-kernel",
        "gqn_fast-fused-aten-bwd",
        "gqn_fast-fused-triton-bwd",
        "gqn_fast-fused-one-dot-aten-bwd",
    } <= cell_providers
    providers = {r["provider"] for r in rows if r["workload"] == "train_step"}
    assert {"reference-eager", "reference-compile", "gqn_fast-eager", "gqn_fast-compile"} <= providers
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["device"] == env["device"]
    feed = [r for r in rows if r["workload"] == "feed"]  # the rate per core: CPU time of every process in it
    assert feed and all(0 < r["scenes_per_cpu_s"] < float("inf") for r in feed)
    steps = [r for r in rows if r["workload"] == "train_step"]
    assert all(r["speedup"] > 0 and r["flops"] > 0 and r["saved_bytes"] > 0 for r in steps)
    # What each eager step dispatches (bench/op_count.py), beside its time.
    eager_steps = [r for r in steps if r["provider"].endswith("-eager")]
    assert eager_steps and all(r["ops_per_step"] > 0 and r["autograd_nodes"] > 0 for r in eager_steps)
    assert "autograd nodes" in (out / "results.md").read_text()
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


def merge(out, *runs):
    """bench/report.py merging the run folders `runs` into `out`, as a user calls it."""
    command = [sys.executable, str(ROOT / "bench" / "report.py"), "--out", str(out), *map(str, runs)]
    return subprocess.run(command, capture_output=True, text=True)


def test_merged_runs_keep_each_rows_commit(tmp_path):
    """bench/report.py --out DIR RUN...: one table from runs of one preset each."""
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    env = {"device": "cpu (x86_64, 1 threads)", "torch": "2.13"}
    row = {
        "workload": "train_step",
        "preset": "small",
        "batch": 8,
        "precision": "fp32",
        "mode": "fwd+bwd+adam",
        "median_ms": 100.0,
        "p20_ms": 90.0,
        "p80_ms": 110.0,
        "peak_bytes": 1000,
    }
    for name, commit, preset, fast_ms in [("a", "abc", "small", 50.0), ("b", "def", "paper-pool", 25.0)]:
        rows = [
            dict(row, preset=preset, provider="reference-eager"),
            dict(row, preset=preset, provider="gqn_fast-eager", median_ms=fast_ms, p20_ms=fast_ms, p80_ms=fast_ms),
        ]
        report.write(
            tmp_path / name, dict(env, commit=commit, date=name, command=f"run {name}"), {"copy_GBps": 1.0}, rows
        )
    run = merge(tmp_path / "merged", tmp_path / "a", tmp_path / "b")
    assert run.returncode == 0, run.stderr
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["environment"]["commit"] == "abc; def" and merged["environment"]["command"] == "run a; run b"
    speedups = {(r["preset"], r["provider"]): (r["speedup"], r["commit"]) for r in merged["rows"]}
    assert speedups[("small", "gqn_fast-eager")] == (2.0, "abc")
    assert speedups[("paper-pool", "gqn_fast-eager")] == (4.0, "def")
    other = dict(env, device="NVIDIA H100", commit="x", date="c")
    report.write(tmp_path / "c", other, {"copy_GBps": 1.0}, [dict(row, provider="reference-eager")])
    run = merge(tmp_path / "m2", tmp_path / "a", tmp_path / "c")
    assert run.returncode != 0 and "expected one device" in run.stderr


def test_repeats_must_be_positive(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--repeats", "0", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2 and "--repeats: expected a positive number, got 0" in run.stderr
    assert not (tmp_path / "r").exists()


def test_smoke_never_writes_among_the_committed_results(tmp_path):
    committed = ROOT / "bench" / "results" / "cpu-x86_64-1-threads"
    before = (committed / "results.json").read_bytes()
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--only", "data", "--out", str(committed)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2 and "among the committed results" in run.stderr
    assert (committed / "results.json").read_bytes() == before


def test_profile_step_smoke_writes_the_split_of_the_step(tmp_path):
    """bench/profile_step.py: where a step's time goes, with what op_count counts beside it."""
    out = tmp_path / "profile"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_step.py"), "--smoke", "--repeats", "2",
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_ms"] > 0 and 0 < summary["issue_ms"] <= summary["wall_ms"]
    assert summary["op_count"]["ops"] > 0 and summary["op_count"]["autograd nodes"] > 0
    table = (out / "profile.txt").read_text()
    assert "top ops by host time" in table and "aten::convolution" in table
