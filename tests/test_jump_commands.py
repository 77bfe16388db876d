"""Consistent GQN through the commands: `gqn-fast train --preset jump-small` on the built-in rooms,
export to safetensors, and eval (with its consistency measures) and sample from the export."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import make_tiny_dataset

from gqn_fast import cli
from gqn_fast.consistency import consistency_metrics, consistency_sums


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(dataset, run folder, model.safetensors) of a 3-step jump-small run."""
    root = tmp_path_factory.mktemp("jump")
    data = make_tiny_dataset(root / "rooms", scenes=8)
    run = root / "run"
    train = ["train", "--data", str(data), "--out", str(run), "--preset", "jump-small", "--steps", "3"]
    options = ["--batch", "2", "--max-context", "2", "--checkpoint-every", "3", "--image-every", "1000"]
    assert cli.main([*train, *options, "--log-every", "1", "--device", "cpu"]) == 0
    model = root / "model"
    assert cli.main(["export", str(run / "checkpoints" / "step-00000003.pt"), str(model), "--keep-data-path"]) == 0
    return data, run, model / "model.safetensors"


def test_train_logs_each_step_and_exports_the_jump_parameters(exported):
    _, run, model = exported
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    names = load_file(model)
    assert "latent_cores.0.cell.conv.weight" in names and "renderer_cores.0.upsample_h.weight" in names


def test_eval_reports_the_consistency_of_views_of_one_latent(exported, tmp_path, capsys):
    data, _, model = exported
    out = tmp_path / "eval"
    argv = ["eval", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert cli.main([*argv, "--scenes", "2", "--max-context", "1", "--samples", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    consistency = metrics["consistency"]
    assert consistency["latents"] == 2 and "agreement" in consistency["about"]
    assert consistency["identical_view"]["same_z_max_abs_diff"] == 0  # one z, one image
    assert consistency["identical_view"]["independent_z_mse"] > 0
    near = consistency["nearby_view"]
    assert near["agreement"] == pytest.approx(1 - near["same_z_mse"] / near["independent_z_mse"])
    assert "consistency (2 latents a scene)" in capsys.readouterr().out


def test_sample_draws_pictures_from_the_export(exported, tmp_path):
    data, _, model = exported
    out = tmp_path / "samples"
    argv = ["sample", str(model), "--data", str(data), "--out", str(out), "--device", "cpu"]
    assert cli.main([*argv, "--scenes", "1", "--samples", "1", "--frames", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scene-0000-fly-around.gif", "scene-0000.png"]


def test_consistency_measures_of_known_images():
    """Two latents, one scene: renders of v from z_0 are 0, from z_1 are 1, v' differs by 0.5
    from v under each: same-z MSE 0.25, independent-z MSE (0.5^2 + 1.5^2) / 2 = 1.25."""
    images = torch.zeros(2, 1, 3, 3, 64, 64)
    images[1] += 1
    images[:, :, 2] += 0.5
    metrics = consistency_metrics([consistency_sums(images)], scenes=1, latents=2)
    assert metrics["identical_view"] == {"same_z_max_abs_diff": 0.0, "independent_z_mse": 1.0}
    near = metrics["nearby_view"]
    assert near["same_z_mse"] == 0.25 and near["independent_z_mse"] == 1.25
    assert near["agreement"] == pytest.approx(0.8)
