"""Opening a model file never runs code, and every file a command reads is checked first.

A crafted pickle (in the config, or hidden in the optimizer state) is given to every command
that reads a model or a checkpoint: each refuses it in one line, exit 1, and the command the
pickle carries never runs. Damaged and mismatched published models are named the same way.
"""

import json
import os
import struct

import numpy as np
import pytest
import torch
from tiny_run import make_tiny_checkpoint, make_tiny_dataset

from gqn_fast import cli
from gqn_fast.checkpoint import load_checkpoint, save_checkpoint
from gqn_fast.model_file import read_model_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    data = make_tiny_dataset(root / "rooms")
    ckpt = make_tiny_checkpoint(root / "run", data)
    published = root / "published.safetensors"
    assert cli.main(["export", str(ckpt), str(published), "--keep-data-path"]) == 0
    return data, ckpt, published


class Payload:
    """Unpickling it runs `touch MARKER`: what a hostile model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_files(ckpt, folder, marker):
    """A checkpoint whose config is the payload, and one with the payload in its optimizer state."""
    state = torch.load(ckpt, weights_only=True)
    in_config = folder / "config" / "checkpoints" / "step-00000007.pt"
    in_optimizer = folder / "optimizer" / "checkpoints" / "step-00000007.pt"
    for path in (in_config, in_optimizer):
        path.parent.mkdir(parents=True)
    torch.save({**state, "config": Payload(marker)}, in_config)
    optimizer = dict(state["optimizer"], state={0: {"step": Payload(marker)}})
    torch.save({**state, "optimizer": optimizer}, in_optimizer)
    return {"config": in_config, "optimizer": in_optimizer}


def commands(path, data):
    return {
        "eval": ["eval", str(path), "--scenes", "1", "--device", "cpu"],
        "sample": ["sample", str(path), "--scenes", "1", "--device", "cpu"],
        "analyze tsne": ["analyze", "tsne", str(path), "--device", "cpu"],
        "analyze algebra": ["analyze", "algebra", str(path), "--device", "cpu"],
        "analyze composition": ["analyze", "composition", str(path), "--device", "cpu"],
        "export": ["export", str(path), str(path.parent / "exported.safetensors")],
        "train --resume": [
            "train",
            "--data",
            str(data),
            "--out",
            str(path.parent.parent),
            "--resume",
            "--steps",
            "9",
            "--batch",
            "2",
            "--device",
            "cpu",
        ],
    }


def test_the_payload_runs_when_unpickled_the_unsafe_way(run, tmp_path):
    """The control: the crafted file does run its command under weights_only=False."""
    _, ckpt, _ = run
    marker = tmp_path / "marker"
    files = hostile_files(ckpt, tmp_path, marker)
    torch.load(files["config"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["config", "optimizer"])
def test_no_command_runs_a_pickled_payload(run, tmp_path, capsys, where):
    data, ckpt, _ = run
    marker = tmp_path / "marker"
    path = hostile_files(ckpt, tmp_path, marker)[where]
    for name, argv in commands(path, data).items():
        assert cli.main(argv) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "refused" in err, (name, err)
        assert "GLOBAL posix.system" in err or "GLOBAL os.system" in err, err
        assert not marker.exists(), f"{name} ran the file's code"
    assert not (path.parent.parent / "config.json").exists()  # train wrote nothing either


def test_a_version_1_checkpoint_still_loads_and_resumes_exactly(run, tmp_path):
    """Version 1 kept NumPy's RNG state as an ndarray: it loads with only NumPy's array allowed,
    and a run resumed from it ends where the run that was not stopped ends."""
    import random

    data, _, _ = run
    train = [
        "train",
        "--data",
        str(data),
        "--batch",
        "2",
        "--device",
        "cpu",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--image-every",
        "100",
    ]
    assert cli.main(train + ["--out", str(tmp_path / "straight"), "--steps", "2"]) == 0
    assert cli.main(train + ["--out", str(tmp_path / "old"), "--steps", "1"]) == 0
    path = tmp_path / "old" / "checkpoints" / "step-00000001.pt"
    state = load_checkpoint(path)
    numpy_state, python_state = state["rng"]["numpy"], state["rng"]["python"]
    v1_rng = {
        **state["rng"],
        "numpy": (
            numpy_state["kind"],
            np.array(numpy_state["keys"], np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        ),
        "python": (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]),
    }
    torch.save({**state, "version": 1, "rng": v1_rng}, path)
    loaded = load_checkpoint(path)
    assert loaded["version"] == 1 and isinstance(loaded["rng"]["numpy"][1], np.ndarray)
    random.seed(1)  # the resume must restore every RNG, not find it as it was
    assert cli.main(train + ["--out", str(tmp_path / "old"), "--steps", "2", "--resume"]) == 0
    resumed = load_checkpoint(tmp_path / "old" / "checkpoints" / "step-00000002.pt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-00000002.pt")
    assert resumed["version"] == 2
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_new_checkpoints_hold_only_tensors_and_plain_values(run):
    """A checkpoint loads with weights_only=True and no allowed globals at all."""
    _, ckpt, _ = run
    state = torch.load(ckpt, weights_only=True)
    assert state["version"] == 2 and isinstance(state["rng"]["numpy"]["keys"], list)


def _header(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write(path, header, body):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def damaged_models(published, folder):
    """name -> (file, what the one-line error must say)."""
    raw = published.read_bytes()
    header, body = _header(published)
    cases = {}

    def case(name, data, says):
        path = folder / f"{name}.safetensors"
        path.write_bytes(data) if isinstance(data, bytes) else _write(path, *data)
        cases[name] = (path, says)

    case("truncated", raw[: len(raw) // 2], "damaged .safetensors file")
    case("header cut", raw[:40], "damaged .safetensors file")
    case("empty", b"", "not a gqn-fast model")
    case("text", b"hello, this is not a model\n", "not a gqn-fast model")
    meta = header["__metadata__"]
    case("no metadata", ({k: v for k, v in header.items() if k != "__metadata__"}, body), "not a gqn-fast model")
    case(
        "unknown config key",
        (
            {**header, "__metadata__": {**meta, "config": json.dumps({**json.loads(meta["config"]), "dropout": 0.1})}},
            body,
        ),
        "config: unknown fields ['dropout']",
    )
    case(
        "wrong-typed config",
        ({**header, "__metadata__": {**meta, "config": json.dumps({**json.loads(meta["config"]), "L": "two"})}}, body),
        "config: L: expected a positive int",
    )
    case("bad step", ({**header, "__metadata__": {**meta, "step": "-3"}}, body), "step: expected a non-negative int")
    case("unknown metadata", ({**header, "__metadata__": {**meta, "notes": "x"}}, body), "unknown ['notes']")
    case("not json", ({**header, "__metadata__": {**meta, "training": "{oops"}}, body), "'training' is not JSON")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(published))
    name = sorted(tensors)[0]

    def with_tensor(case_name, value, says):
        path = folder / f"{case_name}.safetensors"
        save_file({**tensors, name: value}, str(path), metadata=meta)
        cases[case_name] = (path, says)

    with_tensor("wrong shape", torch.zeros(3, *tensors[name].shape), f"{name}: shape")
    with_tensor("wrong dtype", tensors[name].to(torch.int32), f"{name}: dtype torch.int32")
    with_tensor("nan", torch.full_like(tensors[name], float("nan")), f"{name}: holds NaN")
    missing = folder / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if k != name}, str(missing), metadata=meta)
    cases["missing tensor"] = (missing, f"1 missing ({name})")
    return cases


def test_damaged_or_mismatched_published_models_are_named_in_one_line(run, tmp_path, capsys):
    data, ckpt, published = run
    for name, (path, says) in damaged_models(published, tmp_path).items():
        assert cli.main(["eval", str(path), "--device", "cpu", "--scenes", "1"]) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gqn-fast eval: error: ") and str(path) in err, (name, err)
        assert says in err, (name, err)


def test_a_file_that_is_no_checkpoint_says_what_it_is_not(tmp_path, capsys):
    for name, data in {"notes.pt": b"some text", "empty.pt": b"", "zip.pt": b"PK\x03\x04broken zip"}.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert cli.main(["eval", str(path), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err
        assert "not a gqn-fast model" in err or "damaged checkpoint" in err, err
        assert "UnpicklingError" not in err and "MARK" not in err


def test_a_checkpoint_missing_a_piece_is_named(run, tmp_path, capsys):
    data, ckpt, _ = run
    state = load_checkpoint(ckpt)
    folder = tmp_path / "run" / "checkpoints"
    save_checkpoint(folder, 7, {k: v for k, v in state.items() if k not in ("version", "step", "optimizer")}, keep=1)
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--resume",
                "--steps",
                "9",
                "--batch",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    assert "no 'optimizer'" in capsys.readouterr().err
    broken = {**state, "model": {**state["model"], "extra": "not a tensor"}}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(Exception, match="expected a mapping of parameter names to tensors"):
        read_model_file(tmp_path / "broken.pt")


def test_a_folder_stands_for_its_model_file(run, tmp_path, capsys):
    _, _, published = run
    folder = tmp_path / "model"
    folder.mkdir()
    assert cli.main(["eval", str(folder), "--device", "cpu"]) == 1
    assert "a folder without model.safetensors" in capsys.readouterr().err
    (folder / "model.safetensors").write_bytes(published.read_bytes())
    assert read_model_file(folder).step == 7
