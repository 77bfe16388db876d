"""Attention GQN through the command line: `train --preset attention-small` on built-in rooms,
export to safetensors, eval and sample from the export, and the analyses of one r refused in one
line."""

import json

import pytest
import torch
from tiny_run import make_tiny_dataset

from gqn_fast import cli, evaluate
from gqn_fast.attention import AttentionGQN


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset, published model folder) of 3 steps of `train --preset attention-small`."""
    root = tmp_path_factory.mktemp("attention")
    data = make_tiny_dataset(root / "rooms")
    run = root / "run"
    argv = ["train", "--preset", "attention-small", "--data", str(data), "--out", str(run)]
    argv += ["--steps", "3", "--batch", "2", "--max-context", "2", "--device", "cpu", "--image-every", "1000"]
    assert cli.main(argv) == 0
    (checkpoint,) = sorted((run / "checkpoints").glob("step-*.pt"))[-1:]
    assert checkpoint.name == "step-00000003.pt"
    published = root / "published"
    assert cli.main(["export", str(checkpoint), str(published)]) == 0
    return data, published


def test_train_export_and_load(trained):
    _, published = trained
    model, model_file = evaluate.load_model(published, torch.device("cpu"))
    assert isinstance(model, AttentionGQN) and model_file.config.model == "attention"
    assert model_file.step == 3
    reference, _ = evaluate.load_model(published, torch.device("cpu"), impl="reference")
    assert type(reference).__name__ == "AttentionGQN" and reference is not model


def test_eval_and_sample_read_the_export(trained, tmp_path):
    _, published = trained
    out = tmp_path / "eval"
    options = ["--scenes", "2", "--max-context", "2", "--samples", "1", "--batch", "2", "--device", "cpu"]
    assert cli.main(["eval", str(published), *options, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["context_views"] for c in metrics["curve"]] == [1, 2]
    out = tmp_path / "sample"
    options = ["--scenes", "1", "--samples", "1", "--frames", "2", "--context", "2", "--device", "cpu"]
    assert cli.main(["sample", str(published), *options, "--out", str(out)]) == 0
    assert any(out.iterdir())


@pytest.mark.parametrize("analysis", ["tsne", "algebra"])
def test_analyses_of_one_r_say_why_not_in_one_line(trained, tmp_path, capsys, analysis):
    _, published = trained
    assert cli.main(["analyze", analysis, str(published), "--device", "cpu", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"analyze {analysis}: an attention GQN represents a scene as a set of patch keys and values" in err
    assert not (tmp_path / "a").exists()
