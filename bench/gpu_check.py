"""The GPU check, in one command and one folder per device call:

    python bench/gpu_check.py --out DIR [--plan first|second] [--budget 540] [--tar FILE]

On a machine whose results come back by copying a folder, DIR can stay on the machine and FILE
go into the folder copied back: the archive (without the runs' checkpoints) is what matters.

Parts, each run even when an earlier one failed, each in its own process with a time limit
taken from one overall budget (default 9 minutes, inside a 10-minute command limit), most
telling first, so that a call cut short keeps what decides the project's claims (issue 24):

first plan (the session's one long call):
  install            gqn_fast importable, else `pip install --no-deps --no-build-isolation
                     --no-index -e .` (offline)                                install.log
  environment        GPU, driver, clocks (nvidia-smi), Python, torch, triton, CUDA  environment.txt
  model tests        the whole model on CUDA against the reference first, before any speed
                     (MODEL_TESTS: fp32 with TF32 off, bf16 autocast, graphed training)
                                                     model_tests.log, model_tests.xml
  bench train_step   bench/run.py --quick at B = 36, small, jump-small, attention-small and paper
                     tower, reference and gqn_fast, eager and CUDA-graphed, fp32 and bf16
                                                                    bench/train_step/
  train run          `gqn-fast train` on the built-in rooms for a minute at B = 36: the rate a
                     user gets, against the bench's step                  train_run/, train_run.log
  train download     `gqn-fast train` from a DeepMind download and from its conversion, half a
                     minute each at B = 36: the download's rate against the arrays'
                                                                          train_download/
  bench profile      where a step's time goes (bench/profile_step.py: host against device time,
                     top kernels)                                          bench/profile/<preset>/
  other cuda tests   every other test marked `cuda`, with a small-preset training run on the GPU
                     beside them, exported in fp16 (the model in the box)
                                        other_cuda_tests.log, .xml, box_run/, box_model/
  bench other        the kernels, the conv cell, the representation nets, the data loader and
                     the feed from a DeepMind download against its conversion (1 to 16 worker
                     processes), set against the graphed paper-tower step's scenes/s in the summary
second plan (a short call made at once after the first):
  install, environment, then bench compile: torch.compile of both models at the paper tower,
  B = 36, with the compile time                                           bench/compile/

The CUDA tests run with a per-test timeout, in parallel worker processes (pytest-xdist, where
installed: Triton's compiles are CPU-bound), each failure printed the moment it happens.

and a short summary (tests passed / failed, the headline speedups) printed last and written
to summary.txt. The budgets are printed: GQN_FAST_AUTOTUNE_CONFIGS bounds the implicit-GEMM
autotuning (1 config per kernel for the tests, 6 for the bench); --quick leaves out
torch.compile's max-autotune mode. Without a CUDA GPU it says so in one line and runs the CPU
parts instead (the tests are collected, not run; the bench runs --smoke, the train run a few CPU
steps), so CI can smoke-test both plans (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Most telling first. The first H100 run (dc03939) measured kernels, conv_cell, representation
# and data and ran out of budget before train_step: the whole model comes first now, at B = 36
# with the small preset (launch-bound) and the paper's tower (compute-bound), each case's
# results written as soon as it is measured.
GROUPS = ["train_step", "profile", "kernels", "conv_cell", "representation", "data", "compile"]
FIRST_BENCH, OTHER_BENCH = ["train_step"], ["kernels", "conv_cell", "representation", "data"]


# The whole-model groups' presets (the most telling first: a part cut short by its time limit
# keeps them) and providers, at B = 36. train_step: eager and CUDA-graph
# providers only; torch.compile's take minutes to compile the paper model, and are the second
# plan's group.
GROUP_PRESETS = {"train_step": ["paper-tower", "small", "jump-small", "attention-small"], "compile": ["paper-tower"]}
GROUP_PROVIDERS = {
    "train_step": [
        "reference-eager",
        "reference-cudagraph",
        "gqn_fast-eager",
        "gqn_fast-fused-cells-eager",
        "gqn_fast-cudagraph",
    ],
    "compile": ["reference-compile", "gqn_fast-compile"],
}
GROUP_RUNS = {"compile": "train_step"}  # bench/run.py's group for a group of this script


def _providers(names) -> list[str]:
    return [arg for name in names for arg in ("--provider", name)]


def group_args(group: str) -> list[str]:
    """bench/run.py's arguments for a group on the GPU (none: its defaults)."""
    if group not in GROUP_PRESETS:
        return []
    return (
        [arg for preset in GROUP_PRESETS[group] for arg in ("--preset", preset)]
        + ["--batch", "36"]
        + _providers(GROUP_PROVIDERS[group])
    )


# `python -m gqn_fast`, as a user runs the command.
GQN_FAST = [sys.executable, "-m", "gqn_fast"]
# Whole-model correctness on CUDA, run before anything is timed (under a minute on an H100-class
# GPU with the workers compiling in parallel); the other CUDA tests run after the numbers.
MODEL_TESTS = "cuda_cells_match_reference or bf16_autocast or cuda_graphed or jump_cuda_matches_reference"
# A user's train run on the GPU: small preset, B = 36 (the fastest mode the command offers:
# graphed, the default on one GPU), a record every 50 steps, no checkpoint or picture on the way;
# without a GPU, three CPU steps.
RUN_ON_GPU = ["--preset", "small", "--batch", "36", "--steps", "10000000", "--log-every", "50"]
RUN_ON_GPU += ["--checkpoint-every", "10000000", "--image-every", "10000000"]
RUN_ON_CPU = ["--preset", "small", "--batch", "4", "--steps", "3", "--log-every", "1", "--device", "cpu"]
# The train run: the built-in rooms for a minute of steps.
TRAIN_RUN_ARGS = {
    True: [*RUN_ON_GPU, "--max-minutes", "1"],
    False: [*RUN_ON_CPU, "--builtin-scenes", "16", "--workers", "0"],
}
# The train runs from a download and from its conversion: half a minute each.
TRAIN_DOWNLOAD_ARGS = {True: [*RUN_ON_GPU, "--max-minutes", "0.5"], False: RUN_ON_CPU}
# "profile" is bench/profile_step.py (not a bench/run.py group), at B = 36 for these presets.
PROFILE_PRESETS = ["small", "paper-tower"]
# Seconds each part may take at most (the overall budget may cut them shorter).
CAPS = {
    "install": 120,
    "environment": 30,
    "model_tests": 120,
    "cuda_tests": 300,
    "bench": 300,
    "train_run": 110,
    "train_download": 100,
}
# Per CUDA test: a hypothesis test runs 15 examples, and each new channel count or image size
# compiles the conv cell's three kernels anew (their loop bounds are constexprs), seconds each
# with several workers compiling at once. The first H100 run (60 s per test, one process) was a
# third of the way through when its 4 minutes ran out.
TEST_TIMEOUT_S = 240
AUTOTUNE_CONFIGS = {"cuda_tests": "1", "bench": "6"}


class Clock:
    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, cap: float) -> float:
        """Seconds for the next step: its cap, or what the budget has left (less a margin)."""
        return max(0.0, min(cap, self.left() - 5.0))


def run_logged(command, log: Path, timeout: float, env=None) -> tuple[int | None, float]:
    """Run command with its output to log; (exit code or None on timeout, seconds taken)."""
    start = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(str(c) for c in command) + "\n")
        out.flush()
        try:
            proc = subprocess.run(
                command,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                timeout=timeout,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n*** killed: still running after {timeout:.0f} s ***\n")
            code = None
    return code, time.monotonic() - start


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken torch install: the environment part reports it
        return False


# --- the parts --------------------------------------------------------------------------------


def install(out: Path, clock: Clock) -> tuple[str, bool]:
    if importlib.util.find_spec("gqn_fast") is not None and importlib.util.find_spec("gqn_fast.kernels") is not None:
        (out / "install.log").write_text("gqn_fast is importable: nothing to install\n")
        return "already installed", True
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-e",
        str(ROOT),
    ]
    code, took = run_logged(command, out / "install.log", clock.limit(CAPS["install"]))
    importlib.invalidate_caches()
    return f"pip install -e . exit {code} in {took:.0f} s", code == 0


def environment(out: Path, clock: Clock, budgets: dict) -> tuple[str, bool]:
    probe = (
        "import json, platform, torch\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'cuda (torch built with)': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),\n"
        "        'cuda available': torch.cuda.is_available()}\n"
        "try:\n    import triton; info['triton'] = triton.__version__\n"
        "except ImportError as e:\n    info['triton'] = f'missing ({e})'\n"
        "for name in ('google_crc32c', 'simplejpeg'):\n"
        "    try:\n        __import__(name); info[name] = 'installed'\n"
        "    except ImportError:\n        info[name] = 'missing (only reading TFRecords needs it)'\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update({'gpu': p.name, 'capability': f'{p.major}.{p.minor}', 'SMs': p.multi_processor_count,\n"
        "                 'memory GiB': round(p.total_memory / 2**30, 1)})\n"
        "print(json.dumps(info))\n"
    )
    lines = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"]
    try:
        found = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=clock.limit(CAPS["environment"])
        )
        info = json.loads(found.stdout) if found.returncode == 0 else {"probe failed": found.stderr[-500:]}
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        info = {"probe failed": repr(error)}
    lines += [f"{k}: {v}" for k, v in info.items()]
    query = (
        "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu"
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
        lines += ["nvidia-smi:", smi.stdout.strip() or smi.stderr.strip()]
    except (OSError, subprocess.TimeoutExpired) as error:
        lines.append(f"nvidia-smi: not available ({error.__class__.__name__})")
    lines += ["budgets:"] + [f"  {k}: {v}" for k, v in budgets.items()]
    (out / "environment.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return ", ".join(
        f"{k}={info[k]}" for k in ("gpu", "torch", "triton", "python") if k in info
    ), "probe failed" not in info


def test_workers() -> int:
    """pytest-xdist worker processes for the CUDA tests: one per two CPUs, at most 8 (0: xdist
    is not installed, one process)."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def failures_reported(log: Path) -> list[str]:
    """Node ids of the failures the tests printed as they happened (GQN_REPORT_FAILURES_AT_ONCE)."""
    prefix = "=== FAILED "
    return [line[len(prefix):].split(" ")[0] for line in log.read_text(errors="replace").splitlines()
            if line.startswith(prefix)]  # fmt: skip


def cuda_tests(out: Path, clock: Clock, gpu: bool, name: str, select: str, cap: float) -> tuple[str, bool]:
    """The CUDA tests that pytest's -k `select` picks, logged as <name>.log and <name>.xml."""
    junit = out / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-k", select, "-q", "-rfE", "-p", "no:cacheprovider",
               "--hypothesis-profile=ci", f"--junitxml={junit}", "tests"]  # fmt: skip
    workers = test_workers() if gpu else 0
    if workers:
        command += ["-n", str(workers)]
    if gpu:
        command += ["-o", f"faulthandler_timeout={TEST_TIMEOUT_S}"]
    else:
        command.append("--collect-only")  # no GPU: check they are found, run none
    env = {"GQN_TEST_TIMEOUT": str(TEST_TIMEOUT_S), "GQN_FAST_AUTOTUNE_CONFIGS": AUTOTUNE_CONFIGS["cuda_tests"],
           "GQN_REPORT_FAILURES_AT_ONCE": "1"}  # fmt: skip
    log = out / f"{name}.log"
    code, took = run_logged(command, log, clock.limit(cap), env)
    if code is None:
        failed = failures_reported(log)
        return (
            f"timed out after {took:.0f} s with {len(failed)} failures reported so far (see {log.name}; "
            f"the junit file is not written)" + "".join(f"\n    FAILED {test}" for test in failed[:15])
        ), False
    if not gpu:
        collected = [line for line in log.read_text().splitlines() if "::" in line]
        return f"{len(collected)} CUDA tests collected, not run (no GPU); exit {code}", code == 0 and len(collected) > 0
    if not junit.exists():
        return f"pytest exit {code} without a junit file (see {log.name})", False
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    summary = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped in {took:.0f} s")  # fmt: skip
    return summary + "".join(f"\n    FAILED {test}" for test in failed[:15]), code == 0


def bench(out: Path, clock: Clock, gpu: bool, groups: list[str]) -> tuple[str, bool, list[dict]]:
    """bench/run.py for each group (bench/profile_step.py for "profile"); without a GPU, one
    --smoke run of them all (bench/smoke/<groups>/) and a profile --smoke."""
    if not groups:
        return "no group selected (--bench-only)", True, []
    env = {"GQN_FAST_AUTOTUNE_CONFIGS": AUTOTUNE_CONFIGS["bench"], "PYTHONUNBUFFERED": "1"}
    script = str(ROOT / "bench" / "run.py")
    profiler = str(ROOT / "bench" / "profile_step.py")
    if not gpu:
        timed = [group for group in groups if group != "profile"]
        state, ok, rows = "", True, []
        if timed:
            only = [arg for group in dict.fromkeys(GROUP_RUNS.get(g, g) for g in timed) for arg in ("--only", group)]
            # A group that is a choice of another's providers (compile) smoke-tests those providers.
            providers = []
            if all(g in GROUP_RUNS for g in timed):
                providers = _providers(name for g in timed for name in GROUP_PROVIDERS[g])
            folder = out / "bench" / "smoke" / "-".join(timed)
            command = [sys.executable, script, "--smoke", *only, *providers, "--out", str(folder)]
            code, took = run_logged(
                command, out / f"bench_smoke_{'-'.join(timed)}.log", clock.limit(CAPS["bench"]), env
            )
            ok, state, rows = (
                code == 0,
                f"--smoke (no GPU) of {', '.join(timed)}: exit {code} in {took:.0f} s",
                _rows(folder),
            )
        if "profile" in groups:
            command = [sys.executable, profiler, "--smoke", "--out", str(out / "bench" / "profile" / "smoke")]
            profile_code, _ = run_logged(command, out / "bench_profile.log", clock.limit(CAPS["bench"]), env)
            ok, state = (
                ok and profile_code == 0,
                "; ".join(filter(None, [state, f"profile --smoke exit {profile_code}"])),
            )
        return state, ok, rows
    lines, rows, ok = [], [], True
    for group in groups:
        limit = clock.limit(CAPS["bench"])
        if limit < 20:
            lines.append(f"{group}: not run, the budget is spent")
            ok = False
            continue
        folder = out / "bench" / group
        if group == "profile":  # each preset in its own process and log
            for preset in PROFILE_PRESETS:
                command = [sys.executable, profiler, "--preset", preset, "--batch", "36", "--out", str(folder / preset)]
                code, took = run_logged(command, out / f"bench_profile_{preset}.log", clock.limit(CAPS["bench"]), env)
                state = f"killed after {took:.0f} s (budget)" if code is None else f"exit {code} in {took:.0f} s"
                lines.append(f"profile {preset}: {state}")
                ok = ok and code == 0
            continue
        command = [
            sys.executable,
            script,
            "--quick",
            "--only",
            GROUP_RUNS.get(group, group),
            *group_args(group),
            "--out",
            str(folder),
        ]
        code, took = run_logged(command, out / f"bench_{group}.log", limit, env)
        state = f"killed after {took:.0f} s (budget)" if code is None else f"exit {code} in {took:.0f} s"
        lines.append(f"{group}: {state}")
        ok = ok and code == 0
        rows += _rows(folder)
    return "; ".join(lines), ok, rows


def run_rate(folder: Path) -> tuple[float | None, int]:
    """(steps/s of a `gqn-fast train` run: the median of its records after the first, which holds
    the start-up and the graphs' capture; the last step logged)."""
    records = []
    try:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        pass
    rates = sorted(r["steps_per_s"] for r in records[1:] or records)
    return (rates[len(rates) // 2] if rates else None), (records[-1]["step"] if records else 0)


def train_run(out: Path, clock: Clock, gpu: bool) -> tuple[str, bool, float | None]:
    """`gqn-fast train` as a user runs it (TRAIN_RUN_ARGS): (state, ok, its steps/s)."""
    folder = out / "train_run"
    command = [*GQN_FAST, "train", *TRAIN_RUN_ARGS[gpu], "--out", str(folder)]
    code, took = run_logged(command, out / "train_run.log", clock.limit(CAPS["train_run"]))
    rate, steps = run_rate(folder)
    where = "B=36 on the GPU" if gpu else "a few CPU steps (no GPU)"
    measured = f"{rate:.2f} steps/s" if rate is not None else "no rate logged"
    state = f"{where}: {steps} steps, {measured} (exit {code} in {took:.0f} s)"
    return state, code == 0 and rate is not None, rate


def train_download(out: Path, clock: Clock, gpu: bool) -> tuple[str, bool]:
    """`gqn-fast train` from a DeepMind download and from its conversion, one after the other
    (TRAIN_DOWNLOAD_ARGS, the loader's workers as train chooses them): the download's steps/s
    against the converted arrays'. The set (bench/data_bench.py's feed set) is written outside
    `out`, which is archived, and removed after."""
    folder = out / "train_download"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write = [sys.executable, str(ROOT / "bench" / "data_bench.py"), "--write-feed-set", tmp]
        code, took = run_logged(write + ([] if gpu else ["--smoke"]), folder / "write.log", clock.limit(60))
        if code != 0:
            return f"writing the set: exit {code} in {took:.0f} s (train_download/write.log)", False
        (download,) = (Path(tmp) / "src").iterdir()  # the one set written, under its DeepMind name
        data = {"converted": Path(tmp) / "converted", "download": download}
        rates, states = {}, []
        for source, root in data.items():
            command = [
                *GQN_FAST,
                "train",
                "--data",
                str(root),
                *TRAIN_DOWNLOAD_ARGS[gpu],
                "--out",
                str(folder / source),
            ]
            env = {"GQN_FAST_CACHE": str(Path(tmp) / "cache")}  # the download's index: not in the user's cache
            code, took = run_logged(command, folder / f"{source}.log", clock.limit(CAPS["train_download"] / 2), env)
            rates[source], steps = run_rate(folder / source)
            measured = f"{rates[source]:.2f} steps/s" if rates[source] is not None else "no rate logged"
            states.append(f"{source} {steps} steps, {measured} (exit {code} in {took:.0f} s)")
    ok = None not in rates.values()
    ratio = f"; download / converted {rates['download'] / rates['converted']:.3f}" if ok else ""
    return "; ".join(states) + ratio, ok


# The model in the box: a small-preset run on the GPU beside the other CUDA tests (which mostly
# compile on the CPU), for the minutes they take, then exported in fp16 (a few MB).
BOX_RUN_ARGS = {
    True: [
        "--preset",
        "small",
        "--batch",
        "36",
        "--steps",
        "10000000",
        "--log-every",
        "500",
        "--checkpoint-every",
        "5000",
        "--image-every",
        "5000",
    ],
    False: TRAIN_RUN_ARGS[False],
}


def tests_beside_a_training_run(out: Path, clock: Clock, gpu: bool) -> tuple[str, bool]:
    """The other CUDA tests, with a training run (BOX_RUN_ARGS) beside them for as long as they
    may take; then the run's last checkpoint exported to box_model/ (gqn-fast export --half)."""
    minutes = max(0.5, (clock.limit(CAPS["cuda_tests"]) - 20) / 60)
    folder = out / "box_run"
    train = [*GQN_FAST, "train", *BOX_RUN_ARGS[gpu], "--out", str(folder)]
    if gpu:
        train += ["--max-minutes", f"{minutes:.2f}"]
    log = (out / "box_run.log").open("w")
    run = subprocess.Popen(train, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        state, ok = cuda_tests(out, clock, gpu, "other_cuda_tests", f"not ({MODEL_TESTS})", CAPS["cuda_tests"])
        try:
            code = run.wait(timeout=max(1.0, clock.limit(60 + 60 * minutes)))
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGINT)  # Ctrl-C: it checkpoints where it is
            code = run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    checkpoints = sorted((folder / "checkpoints").glob("step-*.pt"))
    if not checkpoints:
        return state + f"\n    box run: no checkpoint (exit {code}, see box_run.log)", False
    export = [*GQN_FAST, "export", str(checkpoints[-1]), str(out / "box_model"), "--half"]
    export_code, _ = run_logged(export, out / "box_export.log", max(1.0, clock.limit(60)))
    box = f"box run: {checkpoints[-1].name} (exit {code}), exported to box_model/ (exit {export_code})"
    return state + "\n    " + box, ok and export_code == 0


def graphed_step_ms(rows: list[dict], preset: str) -> float | None:
    """The bench's graphed gqn_fast training step of `preset` at B = 36 in fp32, median ms (None if not measured)."""
    for r in rows:
        if (
            r.get("workload") == "train_step"
            and r.get("provider") == "gqn_fast-cudagraph"
            and r.get("preset") == preset
            and r.get("batch") == 36
            and r.get("precision") == "fp32"
            and "median_ms" in r
        ):
            return r["median_ms"]
    return None


def end_to_end(rows: list[dict], rate: float | None) -> str | None:
    """The train run's rate against the bench's graphed step alone (small preset, B = 36, fp32):
    below 1 by what the loader and the host add."""
    step_ms = graphed_step_ms(rows, "small")
    if rate is None or step_ms is None:
        return None
    bench_rate = 1000.0 / step_ms
    return (
        f"gqn-fast train {rate:.1f} steps/s against the bench's graphed step {bench_rate:.1f}: {rate / bench_rate:.2f}"
    )


def feed_against_step(rows: list[dict]) -> list[str]:
    """Each feed row's scenes/s (bench/data_bench.py) against the graphed paper-tower step's
    (B = 36, fp32): above 1, the loader outruns the training step it feeds."""
    step_ms = graphed_step_ms(rows, "paper-tower")
    feeds = [r for r in rows if r.get("workload") == "feed" and "scenes_per_s" in r]
    if step_ms is None or not feeds:
        return []
    step_rate = 36 * 1000.0 / step_ms
    return [
        f"feed from the {r['source']}, {r['workers']} workers: {r['scenes_per_s']:.0f} scenes/s, "
        f"{r['scenes_per_s'] / step_rate:.2f}x the graphed paper-tower step's {step_rate:.0f}"
        for r in feeds
    ]


def _without_checkpoints(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """The archive leaves out the training runs' checkpoints (optimizer state, megabytes each) so
    that it stays small to copy back; the model in the box travels as box_model/."""
    return None if "/checkpoints" in member.name else member


def _rows(folder: Path) -> list[dict]:
    try:
        return json.loads((folder / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def headline(rows: list[dict], limit: int = 14) -> list[str]:
    """gqn_fast's speedups over the reference (and the fused cell's over the unfused one), best
    per workload, size and precision."""
    best = {}
    for r in rows:
        if not r.get("provider", "").startswith("gqn_fast"):
            continue
        ratio_key = "vs_unfused" if "vs_unfused" in r else "speedup"
        if ratio_key not in r:
            continue
        key = (r.get("workload"), r.get("preset"), r.get("batch"), r.get("precision"))
        if key not in best or r[ratio_key] > best[key][1]:
            best[key] = (r, r[ratio_key], ratio_key)
    lines = []
    for (workload, preset, batch, precision), (r, ratio, key) in list(best.items())[:limit]:
        against = "unfused cell" if key == "vs_unfused" else "baseline"
        lines.append(f"{workload} {preset or ''} B={batch} {precision}: {r['provider']} {ratio:.2f}x vs {against} "
                     f"({r['median_ms']:.3g} ms)")  # fmt: skip
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for every log and result")
    parser.add_argument(
        "--plan",
        choices=["first", "second"],
        default="first",
        help="first: the session's long call; second: torch.compile, a short call after it",
    )
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all parts together (default 540)")
    parser.add_argument("--tar", type=Path, help="also pack the folder into this .tar.gz")
    parser.add_argument("--bench-only", choices=GROUPS, action="append", help="bench only this group (repeatable)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    gpu = cuda_available()
    if not gpu:
        print("gpu_check: no CUDA GPU here: dry run of the CPU parts (CUDA tests collected, bench --smoke)", flush=True)
    budgets = {
        "plan": args.plan,
        "overall": f"{args.budget:.0f} s",
        **{f"{part} at most": f"{cap} s" for part, cap in CAPS.items()},
        "per CUDA test": f"{TEST_TIMEOUT_S} s (GQN_TEST_TIMEOUT)",
        "autotune configs per kernel": f"tests {AUTOTUNE_CONFIGS['cuda_tests']}, bench {AUTOTUNE_CONFIGS['bench']} (GQN_FAST_AUTOTUNE_CONFIGS)",
        "torch.compile": "default mode only (--quick leaves out max-autotune)",
    }
    selected = lambda groups: [g for g in groups if args.bench_only is None or g in args.bench_only]  # noqa: E731
    rows, train_rate = [], []

    def bench_part(groups):
        def part():
            state, ok, measured = bench(out, clock, gpu, selected(groups))
            rows.extend(measured)
            return state, ok

        return part

    def train_part():
        state, ok, rate = train_run(out, clock, gpu)
        train_rate.append(rate)
        return state, ok

    parts = [
        ("install", lambda: install(out, clock)),
        ("environment", lambda: environment(out, clock, budgets)),
    ]
    if args.plan == "first":
        parts += [
            ("model tests", lambda: cuda_tests(out, clock, gpu, "model_tests", MODEL_TESTS, CAPS["model_tests"])),
            ("bench train_step", bench_part(FIRST_BENCH)),
            ("train run", train_part),
            ("train download", lambda: train_download(out, clock, gpu)),
            ("bench profile", bench_part(["profile"])),
            ("other cuda tests", lambda: tests_beside_a_training_run(out, clock, gpu)),
            ("bench other", bench_part(OTHER_BENCH)),
        ]
    else:
        parts += [("bench compile", bench_part(["compile"]))]
    summary, failed = {}, []
    for name, part in parts:
        print(f"--- {name} ({clock.left():.0f} s of the budget left)", flush=True)
        try:
            summary[name], ok = part()
        except Exception as error:  # a part's failure is reported, and the next part runs
            summary[name], ok = f"failed: {error!r}", False
        failed += [] if ok else [name]
    lines = [f"gpu_check summary, {args.plan} plan" + ("" if gpu else " (dry run: no CUDA GPU)")]
    lines += [f"{name}: {text}" for name, text in summary.items()]
    ratios = headline(rows)
    lines += ["headline ratios:"] + [f"  {line}" for line in ratios] if ratios else ["headline ratios: none measured"]
    user_rate = end_to_end(rows, train_rate[0] if train_rate else None)
    if user_rate:
        lines.append(user_rate)
    lines += feed_against_step(rows)
    lines.append(f"parts with problems: {', '.join(failed)}" if failed else "every part ran to the end")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    if args.tar:
        args.tar.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.tar, "w:gz") as tar:
            tar.add(out, arcname=out.name, filter=_without_checkpoints)
    print(text, end="", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
