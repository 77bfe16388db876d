"""`gqn-fast analyze` (tsne, algebra, composition) on a tiny model, the clustering score on
representations whose answer is known, the algebra's scene variants, and the held-out
combination of the built-in renderer."""

import hashlib
import json
import math
import sys

import numpy as np
import pytest
import torch
from helpers import assert_close_rms, ctrl_c_at_module_call, random_scene_batch, rel_rms, tiny_config
from tiny_run import make_tiny_checkpoint, make_tiny_dataset

from gqn_fast import analyze, cli, evaluate
from gqn_fast.data.catalog import is_red
from gqn_fast.data.render import Box
from gqn_fast.data.scenes import sample_scenes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(dataset, checkpoint): 20 test scenes of a rooms set made with --holdout red-boxes
    (seed 3: test scene 18 holds a red box), and a tiny untrained model."""
    root = tmp_path_factory.mktemp("analyze")
    data = make_tiny_dataset(root / "rooms", scenes=40, holdout="red-boxes")
    return data, make_tiny_checkpoint(root / "run", data)


# --- the clustering score ----------------------------------------------------------------------


def test_nearest_neighbour_accuracy_is_one_for_perfect_clusters():
    g = torch.Generator().manual_seed(0)
    centres = 100 * torch.randn(10, 16, generator=g)
    labels = torch.arange(10).repeat_interleave(5)
    points = centres[labels] + torch.randn(50, 16, generator=g)
    assert analyze.nearest_neighbour_accuracy(points, labels) == 1.0


def test_nearest_neighbour_accuracy_is_chance_for_random_points():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(100).repeat_interleave(4)
    points = torch.randn(400, 16, generator=g)
    chance = analyze.chance_accuracy(labels)
    assert chance == pytest.approx(3 / 399)
    # 400 draws at p = 3/399: the count of hits is about Binomial(400, 0.0075), mean 3.
    assert analyze.nearest_neighbour_accuracy(points, labels) <= 12 / 400


def test_nearest_neighbour_accuracy_counts_the_misses():
    points = torch.tensor([[0.0], [1.0], [10.0], [11.5], [30.0], [32.0]])
    labels = torch.tensor([0, 0, 1, 2, 2, 1])
    # 0 and 1 find each other; 10 finds 11.5 (wrong); 11.5 finds 10 (wrong); 30 and 32 find each other (wrong).
    assert analyze.nearest_neighbour_accuracy(points, labels) == pytest.approx(2 / 6)


# --- generate from a given r -------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("representation", ["tower", "pool"])
def test_predicting_from_the_context_representation_equals_predicting_from_the_context(impl, representation):
    from gqn_fast.models import build_model

    model = build_model(tiny_config(representation=representation), impl).eval()
    cx, cv, _, qv = random_scene_batch(3, 2)
    r = model.represent(cx, cv)
    direct = evaluate.predict(model, cx, cv, qv, 2, torch.Generator().manual_seed(5))
    from_r = analyze.predict_from_representation(model, r, qv, 2, torch.Generator().manual_seed(5))
    # Equal up to fp32 rounding: oneDNN's channels-last convs round differently at another batch size.
    assert_close_rms(from_r, direct, 1e-6, "from r")
    other = analyze.predict_from_representation(model, 2 * r, qv, 2, torch.Generator().manual_seed(5))
    assert rel_rms(other, direct) > 1e-3  # the given r is what generate_from used


# --- scene algebra's variants ------------------------------------------------------------------


@pytest.mark.parametrize("prop", list(analyze.PROPERTIES))
def test_algebra_variants_differ_in_exactly_the_intended_property(prop):
    from gqn_fast.data.render import render

    label = analyze.PROPERTIES[prop][1]
    for (A, B, C, D), (cam_x, cam_y), (old, new) in analyze.algebra_triples(prop, 2, seed=1):
        assert old != new
        for edited, plain in ((A, B), (D, C)):
            la, lb = analyze.scene_labels(edited), analyze.scene_labels(plain)
            assert {key for key in la if la[key] != lb[key]} == {label}
            assert la[label] == new and lb[label] == old
        # Same base scene within each pair, another one across pairs.
        assert analyze.scene_labels(A)["floor_colour"] == analyze.scene_labels(B)["floor_colour"]
        assert analyze.scene_labels(A)["floor_colour"] != analyze.scene_labels(C)["floor_colour"]
        images = render([A, B, C, D], torch.from_numpy(np.stack([cam_x, cam_x, cam_y, cam_y])))
        assert not torch.equal(images[0], images[1]) and not torch.equal(images[2], images[3])


# --- the held-out combination -------------------------------------------------------------------


def red_boxes(scenes):
    return sum(isinstance(s, Box) and is_red(s.colour) for scene in scenes for s in scene.shapes)


def test_the_train_split_never_holds_a_red_box_and_the_test_split_does():
    train, _ = sample_scenes("rooms", 0, "train", 0, 400, "red-boxes")
    test, _ = sample_scenes("rooms", 0, "test", 0, 400, "red-boxes")
    assert red_boxes(train) == 0
    assert red_boxes(test) >= 5  # about 400 * 2 objects / 18
    # Without the holdout the train split has them as often as the test split.
    assert red_boxes(sample_scenes("rooms", 0, "train", 0, 400)[0]) >= 5


def test_the_holdout_leaves_the_test_split_and_sets_without_it_unchanged():
    scenes, cameras = sample_scenes("rooms", 0, "test", 0, 100, "red-boxes")
    plain_scenes, plain_cameras = sample_scenes("rooms", 0, "test", 0, 100)
    assert scenes == plain_scenes and np.array_equal(cameras, plain_cameras)
    # Pinned from the generator as it was before holdouts existed (commit 820e4b0): the scenes
    # of a set made without --holdout must never change.
    scenes, cameras = sample_scenes("rooms", 0, "train", 0, 50)
    digest = hashlib.sha256(repr(scenes).encode() + cameras.tobytes()).hexdigest()
    assert digest == PINNED_ROOMS_TRAIN_0_50


PINNED_ROOMS_TRAIN_0_50 = "c87bfb6cc32315aa03be29c29c016c45ca81dc3785d0967b8939c53151d56096"


def test_regenerated_scenes_match_the_stored_images(run):
    from gqn_fast.data.camera import FOV_DEGREES
    from gqn_fast.data.format import open_split
    from gqn_fast.data.render import render

    data, _ = run
    images, cameras, manifest = open_split(data / "test")
    scenes = analyze.builtin_test_scenes(manifest, 0, 3)
    rendered = render(scenes, torch.from_numpy(np.array(cameras[:3])), fov=FOV_DEGREES)
    assert np.array_equal(rendered.numpy(), images[:3])


# --- the commands end to end --------------------------------------------------------------------


def finite(tree):
    if isinstance(tree, dict):
        return all(finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def test_tsne_command(run):
    pytest.importorskip("sklearn", reason="t-SNE needs the [analysis] extra (in [test]; absent on the GPU image)")
    data, ckpt = run
    assert (
        cli.main(["analyze", "tsne", str(ckpt), "--scenes", "8", "--subsets", "3", "--views", "2", "--device", "cpu"])
        == 0
    )
    out = ckpt.parent.parent / "analyze-tsne" / "step-00000007"
    result = json.loads((out / "tsne.json").read_text())
    assert finite(result)
    assert len(result["points"]) == 24 and [p["scene"] for p in result["points"][:4]] == [0, 0, 0, 1]
    accuracy = result["nearest_neighbour_accuracy"]
    assert accuracy["chance"] == pytest.approx(2 / 23)
    assert 0 <= accuracy["r"] <= 1 and 0 <= accuracy["pixels"] <= 1
    labels = result["points"][0]["labels"]
    assert {"object_count", "object0.shape", "object0.colour", "wall_colour", "floor_colour"} <= set(labels)
    assert (out / "tsne.png").stat().st_size > 0


def test_tsne_without_scikit_learn_names_the_extra(run, monkeypatch, capsys):
    _, ckpt = run
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    assert cli.main(["analyze", "tsne", str(ckpt), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'gqn-fast[analysis]'" in err and err.count("\n") == 1


def test_algebra_command(run):
    _, ckpt = run
    assert (
        cli.main(
            [
                "analyze",
                "algebra",
                str(ckpt),
                "--triples",
                "1",
                "--context",
                "2",
                "--queries",
                "2",
                "--samples",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = ckpt.parent.parent / "analyze-algebra" / "step-00000007"
    report = json.loads((out / "algebra.json").read_text())
    assert set(report["properties"]) == set(analyze.PROPERTIES)
    for entry in report["properties"].values():
        assert set(entry["mean"]) == {"r(A) - r(B) + r(C)", "r(C) alone", "r(A) alone", "r(D), the true context"}
        assert all(0 < e["mse"] < 1 for e in entry["mean"].values())
        assert entry["triples"][0]["changed_pixels"] > 0
    assert finite(report)
    from PIL import Image

    # 3 rows (one triple per property) x 9 columns (A, B, C, gap, truth, 4 predictions), 64 px, pad 2, scale 2.
    # Captions (12 px before scaling) under the last row name the columns.
    assert Image.open(out / "algebra.png").size == (2 * (9 * 66 + 2), 2 * (3 * 66 + 2 + 12))


def test_composition_command(run):
    _, ckpt = run
    assert (
        cli.main(
            ["analyze", "composition", str(ckpt), "--context", "2", "--samples", "2", "--show", "1", "--device", "cpu"]
        )
        == 0
    )
    out = ckpt.parent.parent / "analyze-composition" / "step-00000007"
    report = json.loads((out / "composition.json").read_text())
    groups = report["groups"]
    assert report["holdout"] == "red-boxes" and report["scenes"] == 20
    assert sum(g["scenes"] for g in groups.values()) == 20
    assert groups["held-out"]["scenes"] >= 1
    assert [r["scene"] for r in report["per_scene"] if r["group"] == "held-out"] == [
        i for i, scene in enumerate(sample_scenes("rooms", 3, "test", 0, 20)[0]) if red_boxes([scene])
    ]
    assert finite(report)
    for group in groups.values():
        if group["scenes"]:
            assert 0 < group["mse_mean_of_k"] < 1 and 0 < group["mse_best_of_k"] < 1
    assert (out / "composition.png").stat().st_size > 0


def test_composition_refuses_data_without_a_holdout(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "rooms", scenes=4)
    ckpt = make_tiny_checkpoint(tmp_path / "run", data)
    assert cli.main(["analyze", "composition", str(ckpt), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gqn-fast analyze: error: --data: composition needs") and "--holdout red-boxes" in err
    assert not (tmp_path / "run" / "analyze-composition").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tsne", "--scenes", "1"], "--scenes: expected an int >= 2, got 1"),
        (["tsne", "--views", "11"], "--views: expected an int from 1 to 10"),
        (["algebra", "--triples", "0"], "--triples: expected an int >= 1, got 0"),
        (["algebra", "--context", "9", "--queries", "2"], "--context: expected an int from 1 to 8"),
        (["composition", "--context", "10"], "--context: expected an int from 1 to 9"),
    ],
)
def test_bad_arguments_get_one_line(run, capsys, argv, message):
    _, ckpt = run
    assert cli.main(["analyze", argv[0], str(ckpt), "--device", "cpu", *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gqn-fast analyze: error: {message}") and err.count("\n") == 1


def test_ctrl_c_during_an_analysis_is_one_line_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    _, ckpt = run
    ctrl_c_at_module_call(monkeypatch, 5)
    out = tmp_path / "algebra"
    argv = ["analyze", "algebra", str(ckpt), "--triples", "1", "--samples", "1", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "gqn-fast analyze: interrupted: nothing written"
    assert not out.exists()


def test_the_tsne_title_shows_the_accuracies_as_the_json_holds_them():
    result = dict(scenes=48, subsets=5, views=2, step=7)
    result["nearest_neighbour_accuracy"] = dict(r=239 / 240, pixels=0.5, chance=4 / 239)
    title = analyze.tsne_title(result)
    assert "accuracy r 0.995833, pixels 0.5, chance 0.0167364" in title, title
