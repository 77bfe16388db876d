"""`python bench/gpu_check.py` on a machine without a GPU: one line saying so, then the CPU
parts (environment, the CUDA tests collected, bench --smoke), one folder and a summary."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_without_a_gpu(tmp_path):
    out, archive = tmp_path / "check", tmp_path / "check.tar.gz"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a dry run even where a GPU exists
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--tar", str(archive),
         "--bench-only", "kernels", "--bench-only", "profile"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.splitlines()[0].startswith("gpu_check: no CUDA GPU here: dry run")
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu_check summary, first plan (dry run: no CUDA GPU)")
    assert run.stdout.endswith(summary)  # printed last
    assert "every part ran to the end" in summary
    # The parts in the order of the first call: the whole model's correctness before any speed.
    parts = [line.split(":")[0] for line in summary.splitlines()[1:] if not line.startswith(" ")]
    assert parts[:9] == [
        "install",
        "environment",
        "model tests",
        "bench train_step",
        "train run",
        "train download",
        "bench profile",
        "other cuda tests",
        "bench other",
    ], parts
    environment = (out / "environment.txt").read_text()
    assert "torch: " in environment and "triton: " in environment and "GQN_FAST_AUTOTUNE_CONFIGS" in environment
    collected = {}
    for name in ("model_tests", "other_cuda_tests"):
        collected[name] = [line for line in (out / f"{name}.log").read_text().splitlines() if "::" in line]
        assert f"{len(collected[name])} CUDA tests collected" in summary
        assert all("cuda" in line or "gpu" in line.lower() for line in collected[name]), collected[name][:5]
    model, other = collected["model_tests"], collected["other_cuda_tests"]
    assert len(model) >= 5 and len(other) >= 50 and not set(model) & set(other)
    assert any("cells_match_reference" in t for t in model) and any("bf16_autocast" in t for t in model)
    assert any("graphed_training_follows_eager" in t for t in model)
    records = [json.loads(line) for line in (out / "train_run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "train run: a few CPU steps (no GPU): 3 steps" in summary
    # The same runs from a download and from its conversion, the set written outside the archive.
    for source in ("converted", "download"):
        records = [
            json.loads(line) for line in (out / "train_download" / source / "metrics.jsonl").read_text().splitlines()
        ]
        assert records[-1]["step"] == 3, source
        assert f"{source} 3 steps" in summary
    assert "download / converted " in summary
    # The run beside the other CUDA tests, exported as the model in the box (fp16 safetensors).
    assert "box run: step-00000003.pt (exit 0), exported to box_model/ (exit 0)" in summary
    from gqn_fast.model_file import read_model_file

    box = read_model_file(out / "box_model")
    assert box.step == 3 and all(t.dtype == torch.float16 for t in box.params.values())
    rows = json.loads((out / "bench" / "smoke" / "kernels" / "results.json").read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r]
    assert "gqn_fast" in summary.split("headline ratios:")[1]
    assert "profile --smoke exit 0" in summary
    assert json.loads((out / "bench" / "profile" / "smoke" / "summary.json").read_text())["wall_ms"] > 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert "check/summary.txt" in names and "check/bench/smoke/kernels/results.json" in names
        assert "check/box_model/model.safetensors" in names and not [n for n in names if "/checkpoints" in n]
        assert not [n for n in names if n.endswith((".tfrecord", ".npy"))]  # no data set in the archive
    assert archive.stat().st_size < 16 * 2**20  # what the device tool brings back


def test_second_plan_dry_run_compiles_both_models(tmp_path):
    """The second call's plan: torch.compile of the reference and of gqn_fast, in the train_step
    workload (a --smoke run on the CPU)."""
    out = tmp_path / "second"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--plan", "second"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu_check summary, second plan (dry run: no CUDA GPU)")
    assert [line.split(":")[0] for line in summary.splitlines()[1:4]] == ["install", "environment", "bench compile"]
    rows = json.loads((out / "bench" / "smoke" / "compile" / "results.json").read_text())["rows"]
    train = {r["provider"] for r in rows if r["workload"] == "train_step"}
    assert train == {"reference-compile", "gqn_fast-compile"}, train
    assert all(r["compile_s"] > 0 for r in rows if r["workload"] == "train_step") and not [
        r for r in rows if "error" in r
    ]


def test_failures_printed_as_they_happen_are_read_back(tmp_path):
    """A run killed by its time limit still names the failures it printed (GQN_REPORT_FAILURES_AT_ONCE)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    log = tmp_path / "cuda_tests.log"
    log.write_text(
        "..F\n=== FAILED tests/test_a.py::test_b[cuda-fp32] (call) ===\nE  AssertionError\n"
        "=== FAILED tests/test_c.py::test_d (setup) ===\n.\n"
    )
    assert gpu_check.failures_reported(log) == ["tests/test_a.py::test_b[cuda-fp32]", "tests/test_c.py::test_d"]
    workers = gpu_check.test_workers()
    assert 0 <= workers <= 8


def test_group_arguments_name_what_exists():
    """The whole-model groups' presets and providers are ones bench/run.py knows on a GPU: a typo
    would only show on a GPU machine, after minutes of its time."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import run
    import workloads

    cuda_providers = {p.name for p in workloads.model_providers(torch.device("cuda"), smoke=False, quick=True)}
    assert set(gpu_check.GROUP_PROVIDERS) == set(gpu_check.GROUP_PRESETS) == {"train_step", "compile"}
    for group in gpu_check.GROUP_PRESETS:
        providers, presets = gpu_check.GROUP_PROVIDERS[group], gpu_check.GROUP_PRESETS[group]
        assert providers and set(providers) <= cuda_providers, group
        assert presets and set(presets) <= set(run.MODEL_PRESETS), group
        assert gpu_check.GROUP_RUNS.get(group, group) in run.GROUPS
        args = gpu_check.group_args(group)
        assert args.count("--provider") == len(providers) and args.count("--preset") == len(presets)
    assert set(gpu_check.PROFILE_PRESETS) <= set(run.MODEL_PRESETS)


def test_the_feed_is_set_against_the_graphed_step():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    step = dict(workload="train_step", provider="gqn_fast-cudagraph", preset="paper-tower", batch=36)
    rows = [
        {**step, "precision": "fp32", "median_ms": 36.0},  # 1000 scenes/s
        {**step, "precision": "bf16", "median_ms": 18.0},
        dict(workload="feed", source="download", workers=4, scenes_per_s=2500.0),
    ]
    assert gpu_check.feed_against_step(rows) == [
        "feed from the download, 4 workers: 2500 scenes/s, 2.50x the graphed paper-tower step's 1000"
    ]
    assert gpu_check.feed_against_step(rows[1:]) == []  # no fp32 step measured: nothing to set it against
