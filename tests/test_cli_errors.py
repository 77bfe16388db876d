"""Bad command-line input gets one line on stderr naming the argument or file, exit code 1, and
leaves the run folder as it was: no traceback, nothing half-written, no config overwritten."""

import argparse
import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from gqn_fast import cli
from gqn_fast.checkpoint import list_checkpoints, load_checkpoint
from gqn_fast.train import TrainArgs, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from gqn_fast.data.builtin import make_dataset

    # 11 train scenes of T = 10 views.
    return make_dataset(
        tmp_path_factory.mktemp("data") / "rooms", "rooms", scenes=12, seed=3, workers=1, progress=False
    )


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """A run folder of one step: config.json, metrics.jsonl and a checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(
        TrainArgs(
            data=str(dataset),
            preset="small",
            steps=1,
            batch=2,
            max_context=2,
            out=str(out),
            log_every=1,
            image_every=100,
            checkpoint_every=1,
            device="cpu",
        )
    )
    return out


def snapshot(folder):
    """Every file under `folder` and its bytes (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(capsys, argv, *fragments):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gqn-fast {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    return lines[0]


def train_argv(data, out, *extra):
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch",
        "2",
        "--max-context",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


def _rewrite_manifest(split, **changes):
    manifest = json.loads((split / "manifest.json").read_text())
    manifest.update(changes)
    (split / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path):
    with open(path, "rb+") as f:
        f.truncate(path.stat().st_size - 1000)


@pytest.mark.parametrize(
    "damage, names",
    [
        (lambda d: shutil.rmtree(d), ["no such dataset folder"]),
        (lambda d: _truncate(d / "train" / "images.npy"), ["train/images.npy", "truncated"]),
        (lambda d: _rewrite_manifest(d / "train", num_scenes=20), ["train/manifest.json", "(20, 10)"]),
        (
            lambda d: np.save(d / "train" / "cameras.npy", np.load(d / "train" / "cameras.npy")[..., :4]),
            ["train/cameras.npy", "(N, T, 5)"],
        ),
    ],
)
def test_train_on_a_damaged_dataset(dataset, tmp_path, capsys, damage, names):
    data = shutil.copytree(dataset, tmp_path / "data")
    damage(data)
    out = tmp_path / "run"
    assert_one_line_error(capsys, train_argv(data, out), str(data), *names)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--batch", "12"], ["--batch: 12 is more than the 11 training scenes"]),
        (["--max-context", "10"], ["--max-context: at most T - 1 = 9", "got 10"]),
    ],
)
def test_train_arguments_the_dataset_cannot_serve(dataset, tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    assert_one_line_error(capsys, train_argv(dataset, out, *extra), *fragments)
    assert not out.exists()


COUNTS = [
    "--steps",
    "--batch",
    "--sigma-steps",
    "--builtin-scenes",
    "--max-context",
    "--log-every",
    "--image-every",
    "--checkpoint-every",
    "--keep",
]


@pytest.mark.parametrize(
    "flag, value", [(flag, "0") for flag in COUNTS] + [("--steps", "-3"), ("--workers", "-1"), ("--seed", "-1")]
)
def test_train_refuses_non_positive_counts(dataset, run, capsys, flag, value):
    before = snapshot(run)
    assert_one_line_error(capsys, train_argv(dataset, run, "--resume", flag, value), flag, value)
    assert snapshot(run) == before


def _other_data(dataset, tmp_path):
    return str(shutil.copytree(dataset, tmp_path / "other"))


@pytest.mark.parametrize(
    "setting, value",
    [
        ("batch", "3"),
        ("seed", "5"),
        ("sigma-steps", "100"),
        ("max-context", "3"),
        ("preset", "paper"),
        ("precision", "bf16"),
        ("impl", "reference"),
        ("data", None),
    ],
)
def test_resume_with_another_setting_is_refused_before_anything_is_written(
    dataset, run, tmp_path, capsys, setting, value
):
    before = snapshot(run)
    argv = train_argv(dataset, run, "--resume")
    if setting == "data":
        value = _other_data(dataset, tmp_path)
        argv[argv.index("--data") + 1] = value
    else:
        argv += [f"--{setting}", value]
    line = assert_one_line_error(capsys, argv, f"--{setting}", f"--allow-change {setting}", f"has --{setting} {value}")
    assert "the run was trained with" in line
    assert snapshot(run) == before


def test_an_allowed_change_resumes(dataset, run, tmp_path, capsys):
    out = shutil.copytree(run, tmp_path / "run")
    assert_one_line_error(
        capsys,
        train_argv(dataset, out, "--resume", "--batch", "3", "--allow-change", "batchs"),
        "--allow-change: unknown setting batchs",
    )
    assert (
        cli.main(train_argv(dataset, out, "--resume", "--batch", "3", "--seed", "4", "--allow-change", "batch,seed"))
        == 0
    )
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert state["step"] == 2 and state["train"]["batch"] == 3 and state["train"]["seed"] == 4
    assert json.loads((out / "config.json").read_text())["train"]["batch"] == 3


def test_resume_of_a_finished_run_asks_for_more_steps(run, capsys):
    before = snapshot(run)
    assert_one_line_error(
        capsys, ["train", "--out", str(run), "--resume"], "--steps: the run is at step 1 already", "a larger --steps"
    )
    assert snapshot(run) == before


def test_resume_without_a_checkpoint_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert_one_line_error(
        capsys, train_argv(dataset, out, "--resume"), "--resume:", "holds no checkpoint", "leave out --resume"
    )
    assert not out.exists()
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before its first checkpoint
    before = snapshot(out)
    assert_one_line_error(capsys, train_argv(dataset, out, "--resume"), "holds no checkpoint")
    assert snapshot(out) == before


def test_a_real_process_exits_1_without_a_traceback(dataset, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gqn_fast", *train_argv(dataset, tmp_path / "run", "--keep", "0")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "gqn-fast train: error: --keep: expected a positive int, got 0"
    assert result.stdout == ""


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["train"], ["(default: 2000)", "(default: small)", "(default: 0)", "loader workers"]),
        (["data", "make"], ["(default: 0)"]),
        (["data", "convert-deepmind"], ["(default: ['train', 'test'])"]),
    ],
)
def test_help_shows_the_defaults(capsys, argv, shown):
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for fragment in shown:
        assert fragment in text, fragment
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only torch says; with a GPU the device exists")
@pytest.mark.parametrize(
    "argv", [["train", "--steps", "1"], ["eval", "nothing.pt"], ["data", "make", "rooms", "--scenes", "4"]]
)
def test_a_cuda_device_without_cuda_is_one_line(dataset, tmp_path, capsys, argv):
    extra = ["--out", str(tmp_path / "out")] + (["--data", str(dataset)] if argv[0] == "train" else [])
    assert cli.main([*argv, *extra, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device: cuda asked for, but" in err, err
    assert not (tmp_path / "out").exists()


HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from gqn_fast.cli import build_parser
parser = build_parser()
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["sample", "--help"], ["export", "--help"],
             ["data", "make", "--help"], ["data", "convert-deepmind", "--help"], ["analyze", "algebra", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        parser.parse_args(argv)
print(sorted(m for m in ("torch", "numpy", "PIL", "triton") if m in sys.modules))
"""


def test_help_loads_no_torch():
    """--help is answered from gqn_fast/arguments.py alone: torch, NumPy and PIL stay unloaded."""
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_every_command_names_a_function_that_exists():
    from gqn_fast import analyze
    from gqn_fast.data.catalog import ALGEBRA_PROPERTIES

    parser = cli.build_parser()
    runs = []

    def collect(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)
        if p.get_default("run"):
            runs.append(p.get_default("run"))

    collect(parser)
    assert len(runs) == 10
    assert all(callable(cli.command_function(run)) for run in runs)
    assert tuple(analyze.PROPERTIES) == ALGEBRA_PROPERTIES


def test_one_error_type_and_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Every error a user can fix is a UserError (with its old base); errors.py imports nothing of
    the project; a bare ValueError from a command is a bug and is not turned into one line."""
    import ast
    from pathlib import Path

    from gqn_fast import errors, train
    from gqn_fast.checkpoint import CheckpointError
    from gqn_fast.data.format import DatasetFormatError
    from gqn_fast.data.tfrecord import CorruptRecordError

    for cls, base in (
        (errors.UsageError, ValueError),
        (CheckpointError, RuntimeError),
        (DatasetFormatError, ValueError),
        (CorruptRecordError, ValueError),
        (train.TrainingDiverged, RuntimeError),
    ):
        assert issubclass(cls, errors.UserError) and issubclass(cls, base), cls
    tree = ast.parse(Path(errors.__file__).read_text())
    assert not [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        and "gqn_fast" in (getattr(n, "module", None) or "") + " ".join(a.name for a in n.names)
    ]

    def bug(ns):
        raise ValueError("an internal mistake")

    monkeypatch.setattr("gqn_fast.data.commands._show", bug)
    with pytest.raises(ValueError, match="an internal mistake"):
        cli.main(["data", "show", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--preset", "nope"], "gqn-fast train: error: argument --preset: invalid choice: 'nope'"),
        (["train", "--preset", "smal"], "(did you mean small?)"),
        (["train", "--steps", "abc"], "gqn-fast train: error: argument --steps: invalid int value: 'abc'"),
        (["train", "--stpes", "100"], "gqn-fast train: error: unrecognized argument --stpes (did you mean --steps?)"),
        (["train", "--steps"], "gqn-fast train: error: argument --steps: expected one argument"),
        (["data", "make", "rooms"], "gqn-fast data make: error: the following arguments are required: --out"),
        (["data", "make", "room", "--out", "x"], "argument family: invalid choice: 'room'"),
        (["eval", "a.pt", "b.pt"], "gqn-fast eval: error: unexpected argument 'b.pt'"),
        (["analyze", "tsne", "a.pt", "--scene", "3", "--sbusets", "2"], "--sbusets (did you mean --subsets?)"),
        (["trian", "--steps", "1"], "gqn-fast: error: argument command: invalid choice: 'trian'"),
    ],
)
def test_a_command_line_the_parser_cannot_read_is_one_line(capsys, argv, expected):
    """Exit 1 and one line naming the command and the argument (with the choices, and the
    nearest flag or choice when one is close), not the usage and exit 2."""
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert expected in captured.err, captured.err
    if "invalid choice" in expected:
        assert "(choose from " in captured.err


def test_a_bad_flag_is_one_line_from_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "gqn_fast", "train", "--stpes", "100"], capture_output=True, text=True
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "gqn-fast train: error: unrecognized argument --stpes (did you mean --steps?)\n"


MALLOC_PROBE = """
import sys
from gqn_fast import cli

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) // 1024  # MiB

sys.argv = ["gqn-fast", "--help"]
try:
    cli.main() if sys.argv[1:] and "{how}" == "program" else cli.main(["--help"])
except SystemExit:
    pass
before = rss()
for _ in range(3):
    block = bytearray(16 * 2**20)  # freed at once: glibc's default keeps the later ones in its heap
    del block
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc (mallopt) on Linux")
def test_the_program_gives_freed_memory_back_as_the_bench_measures_it():
    """The `gqn-fast` program's process (cli.main() without argv) has the bench's malloc setting
    (gqn_fast.malloc), so the bench's peak memory is what a command's process gets; a call from
    Python (cli.main(argv)) leaves its process as it is, with glibc's default that keeps it."""
    retained = {}
    for how in ("program", "python"):
        probe = subprocess.run(
            [sys.executable, "-c", MALLOC_PROBE.replace("{how}", how)], capture_output=True, text=True, check=True
        )
        retained[how] = int(probe.stdout.strip().splitlines()[-1])
    assert retained["program"] <= 1 and retained["python"] >= 15, retained
