"""`gqn-fast eval` and `gqn-fast sample` on a tiny model: both kinds of number, predictions
that never read the query image, a new folder per run, and one-line errors for bad arguments."""

import dataclasses
import json
import math

import pytest
import torch
from helpers import ctrl_c_at_call, ctrl_c_at_module_call
from tiny_run import make_tiny_checkpoint, make_tiny_dataset

from gqn_fast import cli, evaluate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(dataset, checkpoint) of a tiny untrained model on 6 test scenes of 10 views."""
    root = tmp_path_factory.mktemp("eval")
    data = make_tiny_dataset(root / "rooms")
    return data, make_tiny_checkpoint(root / "run", data)


def finite_numbers(tree):
    if isinstance(tree, dict):
        return all(finite_numbers(v) for v in tree.values())
    if isinstance(tree, list):
        return all(finite_numbers(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def test_eval_writes_reconstruction_and_prediction_curves_to_a_new_folder_each_time(run):
    data, ckpt = run
    argv = [
        "eval",
        str(ckpt),
        "--scenes",
        "3",
        "--max-context",
        "3",
        "--samples",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    first = ckpt.parent.parent / "eval" / "step-00000007"
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["scenes"] == 3 and metrics["prediction_samples"] == 2 and metrics["step"] == 7
    assert [c["context_views"] for c in metrics["curve"]] == [1, 2, 3]
    assert finite_numbers(metrics)
    for point in metrics["curve"]:
        assert set(point["reconstruction"]) == {
            "neg_elbo_nats",
            "bits_per_dim",
            "kl_nats",
            "nll_nats",
            "nll_above_floor",
            "mse",
        }
        assert all(0 < value < 1 for value in point["prediction"].values())
    assert metrics["prediction"] == metrics["curve"][-1]["prediction"]
    assert (first / "context_curve.png").stat().st_size > 0

    before = (first / "metrics.json").read_bytes()
    assert cli.main(argv) == 0
    second = first.with_name("step-00000007-2")
    assert (second / "metrics.json").read_bytes() == before  # same seed, same numbers, another folder
    assert (first / "metrics.json").read_bytes() == before


def test_predictions_never_read_the_query_image(run, monkeypatch):
    """Change every query image the evaluation sees: the predictions stay bit for bit the
    same, while the reconstruction numbers (which do read it) change."""
    from gqn_fast.data.format import open_split

    data, ckpt = run
    model, _ = evaluate.load_model(ckpt, torch.device("cpu"))
    images, cameras, _ = open_split(data / "test")
    seen = []
    record = evaluate.prediction_errors
    monkeypatch.setattr(evaluate, "prediction_errors", lambda p, q: (seen.append(p.clone()), record(p, q))[1])
    plain = evaluate.split_views

    def evaluate_with(query_change):
        def split_views(x, v, order, views):
            cx, cv, qx, qv = plain(x, v, order, views)
            return cx, cv, query_change(qx), qv

        monkeypatch.setattr(evaluate, "split_views", split_views)
        seen.clear()
        metrics = evaluate.evaluate(model, images, cameras, 1.0, 2, 4, 2, 3, 0, torch.device("cpu"))
        return metrics, list(seen)

    metrics_a, predictions_a = evaluate_with(lambda qx: qx)
    metrics_b, predictions_b = evaluate_with(lambda qx: 1 - qx)
    assert len(predictions_a) == 4  # 2 batches x 2 context sizes
    for a, b in zip(predictions_a, predictions_b):
        assert a.shape == (3, 2, 3, 64, 64)
        assert torch.equal(a, b)
    for M in range(2):
        rec_a, rec_b = metrics_a["curve"][M]["reconstruction"], metrics_b["curve"][M]["reconstruction"]
        assert rec_a["nll_nats"] != rec_b["nll_nats"] and rec_a["kl_nats"] != rec_b["kl_nats"]
        assert metrics_a["curve"][M]["prediction"] != metrics_b["curve"][M]["prediction"]


def test_prediction_errors_of_known_images():
    query = torch.zeros(2, 3, 64, 64)
    predictions = torch.stack([torch.full_like(query, 0.2), torch.full_like(query, 0.6)])
    mean_of_k, best_of_k = evaluate.prediction_errors(predictions, query)
    assert torch.allclose(mean_of_k, torch.full((2,), 0.16))  # (0.2 + 0.6) / 2 = 0.4, squared
    assert torch.allclose(best_of_k, torch.full((2,), 0.04))


def test_sample_writes_pictures_to_a_new_folder_each_time(run):
    from PIL import Image

    _, ckpt = run
    argv = [
        "sample",
        str(ckpt),
        "--scenes",
        "1",
        "--samples",
        "2",
        "--frames",
        "3",
        "--context",
        "2",
        "--device",
        "cpu",
    ]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0
    for name in ("step-00000007", "step-00000007-2"):
        folder = ckpt.parent.parent / "samples" / name
        grid = Image.open(folder / "scene-0000.png")
        # Rows: 2 context views; truth, mean and 2 samples: 4 columns of 64 px at scale 2 with padding,
        # each row captioned (12 px before scaling).
        assert grid.size == (2 * (4 * 66 + 2), 2 * (2 * (66 + 12) + 2))
        assert Image.open(folder / "scene-0000-fly-around.gif").n_frames == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--scenes", "0"], "--scenes: expected an int >= 1, got 0"),
        (["eval", "--batch", "0"], "--batch: expected an int >= 1, got 0"),
        (["eval", "--samples", "0"], "--samples: expected an int >= 1, got 0"),
        (
            ["eval", "--max-context", "10"],
            "--max-context: expected an int from 1 to 9 (the data has 10 views a scene), got 10",
        ),
        (["eval", "--max-context", "0"], "--max-context: expected an int from 1 to 9"),
        (["sample", "--scenes", "0"], "--scenes: expected an int >= 1, got 0"),
        (["sample", "--context", "0"], "--context: expected an int >= 1, got 0"),
        (["sample", "--context", "10"], "--context: expected an int from 1 to 9"),
        (["sample", "--frames", "0"], "--frames: expected an int >= 1, got 0"),
        (["sample", "--samples", "-1"], "--samples: expected an int >= 0, got -1"),
    ],
)
def test_bad_arguments_get_one_line_and_write_nothing(run, tmp_path, capsys, argv, message):
    _, ckpt = run
    out = tmp_path / "out"
    assert cli.main([argv[0], str(ckpt), "--out", str(out), "--device", "cpu", *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gqn-fast {argv[0]}: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_a_missing_checkpoint_gets_one_line(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nope.pt"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gqn-fast eval: error: ") and "nope.pt" in err and err.count("\n") == 1


@pytest.mark.parametrize("command, default", [("eval", "(default: 1000)"), ("sample", "(default: 36)")])
def test_help_shows_defaults(capsys, command, default):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert default in capsys.readouterr().out


def test_export_publishes_a_half_precision_safetensors_model_that_names_its_builtin_data(run, tmp_path, monkeypatch):
    from safetensors import safe_open

    from gqn_fast.checkpoint import load_checkpoint

    data, ckpt = run
    out = tmp_path / "published"
    assert cli.main(["export", str(ckpt), str(out), "--half"]) == 0
    path = out / "model.safetensors"  # a model folder, as Hugging Face lays them out
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        names = set(f.keys())
        assert all(f.get_tensor(name).dtype == torch.float16 for name in names)
    assert set(metadata) == {"format", "format_version", "config", "step", "dataset", "training"}
    # The local folder is replaced by the built-in set's generator (tiny_run: rooms, seed 3).
    assert json.loads(metadata["dataset"]) == {
        "builtin": {"family": "rooms", "seed": 3, "holdout": None, "scenes": 2000}
    }
    original = load_checkpoint(ckpt)
    assert names == set(original["model"]) and json.loads(metadata["step"]) == 7
    model, model_file = evaluate.load_model(out, torch.device("cpu"))  # the folder stands for its file
    assert model_file.step == 7 and model_file.config.to_dict() == original["config"]
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, original["model"][name].half().float(), rtol=0, atol=0)
    # With no local data, eval regenerates the named set in the cache: its test scenes are the
    # stored ones (scene i of a split does not depend on the set's size).
    monkeypatch.setenv("GQN_FAST_CACHE", str(tmp_path / "cache"))
    from gqn_fast.data.format import open_split

    small = dataclasses.replace(model_file, dataset={"builtin": {**model_file.dataset["builtin"], "scenes": 12}})
    regenerated, _, _ = open_split(evaluate.data_folder(small, None) / "test")
    stored, _, _ = open_split(data / "test")
    n = min(len(regenerated), len(stored))  # the sets' test fractions differ
    assert n >= 1 and (regenerated[:n] == stored[:n]).all()


def test_eval_sample_and_analyze_give_the_same_numbers_from_the_export(run, tmp_path):
    """An fp32 export is the checkpoint's model: the commands' JSON numbers are equal."""
    data, ckpt = run
    assert cli.main(["export", str(ckpt), str(tmp_path / "m.safetensors"), "--keep-data-path"]) == 0
    commands = {
        "eval": (["eval"], ["--scenes", "2", "--max-context", "2", "--samples", "1"], "metrics.json"),
        "sample": (["sample"], ["--scenes", "1", "--samples", "1", "--frames", "2", "--context", "2"], None),
        "algebra": (
            ["analyze", "algebra"],
            ["--triples", "1", "--context", "2", "--queries", "1", "--samples", "1", "--properties", "wall-colour"],
            "algebra.json",
        ),
    }
    for name, (command, options, result) in commands.items():
        outputs = []
        for source in (ckpt, tmp_path / "m.safetensors"):
            out = tmp_path / f"{name}-{source.suffix[1:]}"
            assert cli.main(command + [str(source), *options, "--out", str(out), "--device", "cpu"]) == 0
            if result is None:  # pictures: the same bytes
                outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
            else:
                numbers = json.loads((out / result).read_text())
                numbers.pop("checkpoint")
                outputs.append(numbers)
        assert outputs[0] == outputs[1], name


def test_the_published_model_loads_and_predicts():
    """models/small-rooms-redbox/model.safetensors: the model in the box loads into both models and draws images."""
    from pathlib import Path

    from gqn_fast.reference import GQN as ReferenceGQN

    path = Path(__file__).resolve().parents[1] / "models" / "small-rooms-redbox" / "model.safetensors"
    model, model_file = evaluate.load_model(path, torch.device("cpu"))
    assert model_file.step == 11750 and model_file.dataset["builtin"]["holdout"] == "red-boxes"
    reference = ReferenceGQN(model.config)
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    x, v, qv = torch.rand(2, 3, 3, 64, 64), torch.randn(2, 3, 7), torch.randn(2, 7)
    noise = torch.randn(model.config.L, 2, model.config.z_dim, 16, 16)
    fast, plain = model.generate(x, v, qv, noise=noise), reference.generate(x, v, qv, noise=noise)
    assert fast.shape == (2, 3, 64, 64) and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_ctrl_c_during_eval_is_one_line_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    _, ckpt = run
    ctrl_c_at_module_call(monkeypatch, 5)
    out = tmp_path / "eval"
    assert cli.main(["eval", str(ckpt), "--scenes", "3", "--device", "cpu", "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "gqn-fast eval: interrupted: nothing written"
    assert not out.exists()


def test_ctrl_c_while_eval_draws_its_picture_keeps_the_metrics(run, tmp_path, monkeypatch, capsys):
    _, ckpt = run
    ctrl_c_at_call(monkeypatch, evaluate, "plot_curve", 1)  # the metrics are written, the picture not yet
    out = tmp_path / "eval"
    assert cli.main(["eval", str(ckpt), "--scenes", "3", "--device", "cpu", "--out", str(out)]) == 130
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == f"gqn-fast eval: interrupted: kept {out / 'metrics.json'}; its picture was not drawn"
    assert json.loads((out / "metrics.json").read_text())["scenes"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # no half-drawn picture, no temporary
