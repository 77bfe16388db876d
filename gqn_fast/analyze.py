"""`gqn-fast analyze`: what a GQN's scene representation r holds, shown on a checkpoint.

- tsne: r of many test scenes, each from several random subsets of its views, in 2-D (t-SNE),
  coloured by scene and by the scene's attributes; and a number for how well r identifies its
  scene across viewpoints: leave-one-out nearest-neighbour accuracy, against raw pixels.
- algebra: built-in scenes that differ in one property (an object's colour, its shape, the
  wall colour); r(A) - r(B) + r(C) rendered with `generate`, against the true render of the
  intended scene and against r(A) or r(C) alone.
- composition: prediction error on test scenes holding a combination the training split never
  showed (a dataset made with `data make --holdout`), against scenes without it.

Every prediction here comes from `generate` (z from the prior); none reads a query image.
Scene attributes come from the built-in generator, which is deterministic: manifest.json's
"generator" (family, seed, holdout) regenerates each test scene's description, so no labels
are stored with the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import torch
from tqdm import tqdm

from gqn_fast.data.render import Box, Cylinder, Scene, Sphere
from gqn_fast.errors import UsageError, check_int
from gqn_fast.evaluate import (
    draw_samples,
    open_checkpoint,
    output_folder,
    predict,
    prediction_errors,
    scene_views,
    split_views,
    write_report,
)
from gqn_fast.images import save_grid
from gqn_fast.reference import transform_viewpoint

SHAPES = {Sphere: "sphere", Box: "box", Cylinder: "cylinder"}


# --- scene descriptions -----------------------------------------------------------------------


def builtin_test_scenes(manifest: dict, start: int, stop: int) -> list[Scene] | None:
    """The descriptions of test scenes start..stop-1 of a built-in dataset, None for other data."""
    from gqn_fast.data.scenes import sample_scenes

    generator = manifest.get("generator") or {}
    if "family" not in generator:
        return None
    scenes, _ = sample_scenes(generator["family"], generator["seed"], "test", start, stop, generator.get("holdout"))
    return scenes


def scene_labels(scene: Scene) -> dict:
    """A scene's attributes, flat: object_count, object<i>.shape, object<i>.colour, wall_colour, floor_colour."""
    labels = {"object_count": len(scene.shapes)}
    for i, shape in enumerate(scene.shapes):
        labels[f"object{i}.shape"] = SHAPES[type(shape)]
        labels[f"object{i}.colour"] = tuple(shape.colour)
    if scene.room is not None:
        labels["wall_colour"] = tuple(scene.room.wall_colour)
        labels["floor_colour"] = tuple(scene.room.floor_colour)
    return labels


# --- representations --------------------------------------------------------------------------


def require_one_r(model, analysis: str) -> None:
    """Refuse an analysis of r where the model has no single r: attention GQN's scene is a set."""
    if model.config.model == "attention":
        raise UsageError(
            f"analyze {analysis}: an attention GQN represents a scene as a set of patch keys and values, "
            f"not one vector r, so {analysis} of r means nothing for it (analyze composition works)"
        )


def untiled(model, r: torch.Tensor) -> torch.Tensor:
    """r [B, r_dim, 16, 16] as `represent` gives it, in the net's own shape: the pool and pyramid
    nets' r is one vector, tiled to 16x16."""
    return r[:, :, :1, :1] if model.config.r_is_vector else r


def features(model, r: torch.Tensor) -> torch.Tensor:
    """[B, D] from r [B, r_dim, 16, 16]."""
    return untiled(model, r).flatten(1)


def predict_from_representation(model, r, query_v, samples: int, generator) -> torch.Tensor:
    """[samples, B, 3, 64, 64] drawn by `generate_from` from r [B, r_dim, 16, 16] (z from the prior)."""
    return draw_samples(
        model,
        query_v,
        samples,
        generator,
        lambda repeat, noise: model.generate_from(repeat(untiled(model, r)), repeat(query_v), noise=noise),
    )


@torch.no_grad()
def scene_representations(model, images, cameras, scenes: int, subsets: int, views: int, seed: int, device):
    """(r features [n * subsets, D], pixel features [n * subsets, 3 * 64 * 64], scene index [n * subsets]).

    Each scene gives `subsets` random subsets of `views` of its views; a subset's pixel feature
    is the mean of its images (as r sums what the net makes of each view).
    """
    g = torch.Generator().manual_seed(seed)
    T = images.shape[1]
    rs, pixels = [], []
    for i in tqdm(range(scenes), desc="representations", unit="scene"):
        x, v, _ = scene_views(images, cameras, i, device)
        chosen = torch.stack([torch.randperm(T, generator=g)[:views] for _ in range(subsets)]).to(device)
        rs.append(features(model, model.represent(x[chosen], v[chosen])).cpu())
        pixels.append(x[chosen].mean(1).flatten(1).cpu())
    return torch.cat(rs), torch.cat(pixels), torch.arange(scenes).repeat_interleave(subsets)


def nearest_neighbour_accuracy(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out: the share of points whose nearest other point (Euclidean) has their label."""
    points = points.double()
    distance = torch.cdist(points, points)
    distance.fill_diagonal_(math.inf)
    return (labels[distance.argmin(dim=1)] == labels).double().mean().item()


def chance_accuracy(labels: torch.Tensor) -> float:
    """The same accuracy for a random neighbour: the mean share of the other points that share a point's label."""
    same = (labels[:, None] == labels[None, :]).sum(1).double() - 1
    return (same / (labels.numel() - 1)).mean().item()


def require_sklearn():
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise UsageError("t-SNE needs scikit-learn, not installed here: pip install 'gqn-fast[analysis]'") from None
    return TSNE


def tsne_2d(points: torch.Tensor, seed: int) -> np.ndarray:
    TSNE = require_sklearn()
    n = points.shape[0]
    perplexity = float(min(30, max(2, (n - 1) / 3)))  # sklearn needs perplexity < n
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        points.double().numpy()
    )


PANEL_TITLES = {
    "object_count": "object count",
    "object0.shape": "first object's shape",
    "object0.colour": "first object's colour",
    "wall_colour": "wall colour",
    "floor_colour": "floor colour",
}


def plot_tsne(xy: np.ndarray, scene_ids: np.ndarray, labels: list[dict] | None, path, title: str) -> None:
    """Panels coloured by scene, then (built-in data) by each attribute; colours drawn as themselves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("scene", [int(s) for s in scene_ids])]
    if labels:
        for key in ("object_count", "object0.shape", "object0.colour", "wall_colour", "floor_colour"):
            if all(key in lab for lab in labels):
                panels.append((key, [labels[s][key] for s in scene_ids]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        if isinstance(values[0], tuple):  # an RGB colour: draw it
            ax.scatter(xy[:, 0], xy[:, 1], c=np.array(values), s=14, edgecolors="none")
        else:
            kinds = sorted(set(values), key=str)
            cmap = plt.get_cmap("tab20" if name == "scene" else "tab10")
            for j, kind in enumerate(kinds):
                mask = np.array([value == kind for value in values])
                ax.scatter(xy[mask, 0], xy[mask, 1], color=cmap(j % cmap.N), s=14, label=str(kind))
            if name != "scene":
                ax.legend(fontsize=7, loc="best")
        ax.set_title(f"coloured by {PANEL_TITLES.get(name, name)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tsne_title(result: dict) -> str:
    """The figure's title: the accuracies as tsne.json holds them (6 digits: 239/240 is not 1)."""
    acc = result["nearest_neighbour_accuracy"]
    return (
        f"t-SNE of r: {result['scenes']} test scenes x {result['subsets']} subsets of {result['views']} views, "
        f"step {result['step']}; nearest-neighbour scene accuracy r {acc['r']:g}, pixels {acc['pixels']:g}, "
        f"chance {acc['chance']:g}"
    )


def run_tsne(ns: argparse.Namespace) -> int:
    check_int("--scenes", ns.scenes, 2)
    check_int("--subsets", ns.subsets, 2)
    device, model, model_file, images, cameras, manifest = open_checkpoint(ns)
    require_one_r(model, "tsne")
    T = images.shape[1]
    check_int("--views", ns.views, 1, T, f" (the data has {T} views a scene)")
    require_sklearn()  # after the arguments: a bad one is named first, with or without the extra
    n = min(ns.scenes, images.shape[0])
    r, pixels, scene_ids = scene_representations(model, images, cameras, n, ns.subsets, ns.views, ns.seed, device)
    xy = tsne_2d(r, ns.seed)
    scenes = builtin_test_scenes(manifest, 0, n)
    labels = [scene_labels(s) for s in scenes] if scenes is not None else None
    result = {
        "checkpoint": str(ns.checkpoint),
        "step": model_file.step,
        "scenes": n,
        "subsets": ns.subsets,
        "views": ns.views,
        "nearest_neighbour_accuracy": {
            "about": "leave-one-out: share of subsets whose nearest other subset comes from the same scene",
            "r": nearest_neighbour_accuracy(r, scene_ids),
            "pixels": nearest_neighbour_accuracy(pixels, scene_ids),
            "chance": chance_accuracy(scene_ids),
        },
        "points": [
            {"scene": int(s), "x": float(x), "y": float(y), **({"labels": labels[s]} if labels else {})}
            for s, (x, y) in zip(scene_ids.tolist(), xy)
        ],
    }
    out = output_folder(ns.out, ns.checkpoint, "analyze-tsne", model_file.step)
    write_report(
        out / "tsne.json",
        result,
        out / "tsne.png",
        lambda report, picture: plot_tsne(xy, scene_ids.numpy(), labels, picture, tsne_title(report)),
    )
    acc = result["nearest_neighbour_accuracy"]
    print(
        f"nearest-neighbour scene accuracy: r {acc['r']:g}, raw pixels {acc['pixels']:g}, "
        f"chance {acc['chance']:g}; wrote {out / 'tsne.json'} and {out / 'tsne.png'}"
    )
    return 0


# --- scene algebra ------------------------------------------------------------------------------


def with_object_colour(scene: Scene, colour) -> Scene:
    shapes = (dataclasses.replace(scene.shapes[0], colour=tuple(colour)),) + scene.shapes[1:]
    return dataclasses.replace(scene, shapes=shapes)


def with_shape(scene: Scene, kind: str) -> Scene:
    """The first object made a sphere, box or cylinder of the same size, place and colour."""
    first = scene.shapes[0]
    if isinstance(first, Sphere):
        (x, y, _), size = first.centre, first.radius
    elif isinstance(first, Box):
        (x, y, _), size = first.centre, first.half_size[0]
    else:
        (x, y, _), size = first.base, first.radius
    new = {
        "sphere": lambda: Sphere((x, y, size), size, first.colour),
        "box": lambda: Box((x, y, size), (size, size, size), 0.3, first.colour),
        "cylinder": lambda: Cylinder((x, y, 0.0), size, 2 * size, first.colour),
    }[kind]()
    return dataclasses.replace(scene, shapes=(new,) + scene.shapes[1:])


def with_wall_colour(scene: Scene, colour) -> Scene:
    return dataclasses.replace(scene, room=dataclasses.replace(scene.room, wall_colour=tuple(colour)))


# property -> (the edit, the label it changes, values to swap between)
PROPERTIES = {
    "object-colour": (
        with_object_colour,
        "object0.colour",
        [(0.9, 0.15, 0.15), (0.15, 0.35, 0.9), (0.2, 0.8, 0.25), (0.95, 0.85, 0.2)],
    ),
    "shape": (with_shape, "object0.shape", ["sphere", "box", "cylinder"]),
    "wall-colour": (
        with_wall_colour,
        "wall_colour",
        [(0.85, 0.5, 0.5), (0.5, 0.6, 0.9), (0.55, 0.85, 0.55), (0.9, 0.85, 0.5)],
    ),
}


def algebra_triples(prop: str, count: int, seed: int):
    """`count` quadruples (A, B, C, D) of rooms and cameras ([T, 5] per base scene, X then Y):
    A = X with the new value, B = X with the old, C = Y with the old, D = Y with the new, so
    r(A) - r(B) + r(C) should describe D."""
    from gqn_fast.data.scenes import sample_scenes

    edit, _, values = PROPERTIES[prop]
    bases, cams, index = [], [], 0
    while len(bases) < 2 * count:  # rooms with at least one object (placement can fail for all)
        scenes, cameras = sample_scenes("rooms", seed, "test", index, index + 1)
        index += 1
        if scenes[0].shapes:
            bases.append(scenes[0])
            cams.append(cameras[0])
    quads = []
    for t in range(count):
        old, new = values[t % len(values)], values[(t + 1) % len(values)]
        X, Y = bases[2 * t], bases[2 * t + 1]
        quads.append(
            ((edit(X, new), edit(X, old), edit(Y, old), edit(Y, new)), (cams[2 * t], cams[2 * t + 1]), (old, new))
        )
    return quads


@torch.no_grad()
def algebra(model, prop: str, count: int, context: int, queries: int, samples: int, seed: int, device):
    """Per quadruple (A, B, C, D): the query views' truth (D), and predictions from r(A) - r(B) + r(C) and the baselines."""
    from gqn_fast.data.camera import FOV_DEGREES
    from gqn_fast.data.render import render

    g = torch.Generator().manual_seed(seed)
    results = []
    for (A, B, C, D), (cam_x, cam_y), change in tqdm(algebra_triples(prop, count, seed), desc=prop, unit="quadruple"):
        cams = torch.from_numpy(np.stack([cam_x, cam_x, cam_y, cam_y]))
        views = render([A, B, C, D], cams, image_size=64, fov=FOV_DEGREES).to(device)
        x = views.permute(0, 1, 4, 2, 3).float() / 255  # [4, T, 3, 64, 64]
        v = transform_viewpoint(cams.to(device))
        r = model.represent(x[:, :context], v[:, :context])  # one r per variant
        r_a, r_b, r_c, r_d = r.split(1)
        qv = v[3, context : context + queries]
        truth, unedited = x[3, context : context + queries], x[2, context : context + queries]
        changed = (truth != unedited).any(dim=1, keepdim=True).expand_as(truth)  # pixels the edit changes
        methods = {
            "r(A) - r(B) + r(C)": r_a - r_b + r_c,
            "r(C) alone": r_c,
            "r(A) alone": r_a,
            "r(D), the true context": r_d,
        }
        predictions, errors = {}, {}
        for name, rep in methods.items():
            pred = predict_from_representation(model, rep.expand(qv.shape[0], -1, -1, -1), qv, samples, g).mean(0)
            predictions[name] = pred
            errors[name] = {
                "mse": (pred - truth).pow(2).mean().item(),
                "mse_changed_pixels": (pred - truth)[changed].pow(2).mean().item() if changed.any() else None,
            }
        # The picture shows the context view and the query view where the edit shows most.
        k = int((x[0, :context] != x[1, :context]).sum(dim=(1, 2, 3)).argmax())
        q = int(changed[:, 0].sum(dim=(1, 2)).argmax())
        results.append(
            {
                "change": change,
                "errors": errors,
                "changed_pixels": int(changed[:, 0].sum()),
                "picture": list(x[:3, k]) + [None, truth[q]] + [p[q] for p in predictions.values()],
            }
        )
    return results


def run_algebra(ns: argparse.Namespace) -> int:
    check_int("--triples", ns.triples, 1)
    check_int("--queries", ns.queries, 1)
    check_int("--samples", ns.samples, 1)
    check_int("--context", ns.context, 1)
    properties = ns.properties or list(PROPERTIES)
    device, model, model_file, images, _, manifest = open_checkpoint(ns)
    require_one_r(model, "algebra")
    family = (manifest.get("generator") or {}).get("family", "rooms")
    if family != "rooms":
        raise UsageError(f"--data: scene algebra edits built-in rooms, but this model was evaluated on {family!r} data")
    from gqn_fast.data.scenes import get_family

    T = get_family("rooms").num_views
    check_int("--context", ns.context, 1, T - ns.queries, f" (a room has {T} views, {ns.queries} of them queries)")
    report, rows = (
        {
            "checkpoint": str(ns.checkpoint),
            "step": model_file.step,
            "context_views": ns.context,
            "samples": ns.samples,
            "properties": {},
        },
        [],
    )
    for prop in properties:
        triples = algebra(model, prop, ns.triples, ns.context, ns.queries, ns.samples, ns.seed, device)
        methods = list(triples[0]["errors"])
        summary = {}
        for name in methods:
            for key in ("mse", "mse_changed_pixels"):
                values = [t["errors"][name][key] for t in triples if t["errors"][name][key] is not None]
                summary.setdefault(name, {})[key] = float(np.mean(values)) if values else None
        report["properties"][prop] = {
            "label": PROPERTIES[prop][1],
            "mean": summary,
            "triples": [
                {
                    "old": t["change"][0],
                    "new": t["change"][1],
                    "changed_pixels": t["changed_pixels"],
                    "errors": t["errors"],
                }
                for t in triples
            ],
        }
        rows += [t["picture"] for t in triples]
    out = output_folder(ns.out, ns.checkpoint, "analyze-algebra", model_file.step)
    report["grid_columns"] = ["A", "B", "C", "", "D (truth)"] + methods
    short = {"r(A) - r(B) + r(C)": "r(A)-r(B)+r(C)", "r(D), the true context": "r(D)"}  # to fit under a cell
    names = [short.get(name, name) for name in report["grid_columns"]]
    write_report(
        out / "algebra.json",
        report,
        out / "algebra.png",
        lambda _, picture: save_grid(rows, picture, captions=[None] * (len(rows) - 1) + [names]),
    )
    for prop, entry in report["properties"].items():
        errors = ", ".join(f"{name} {e['mse']:.4f}" for name, e in entry["mean"].items())
        print(f"{prop}: MSE against the true render of D: {errors}")
    print(
        f"wrote {out / 'algebra.json'} and {out / 'algebra.png'} (columns: {', '.join(c for c in report['grid_columns'] if c)})"
    )
    return 0


# --- compositionality ------------------------------------------------------------------------


def composition_group(scene: Scene, holdout: str) -> str:
    """'held-out' (the scene shows the held-out combination), 'same colour, other shape',
    'same shape, other colour' (controls; red-boxes only has them), or 'neither'."""
    from gqn_fast.data.catalog import HOLDOUTS, is_red

    kinds = {Sphere: 0, Box: 1, Cylinder: 2}
    if any(HOLDOUTS[holdout](kinds[type(s)], s.colour) for s in scene.shapes):
        return "held-out"
    if holdout == "red-boxes":
        if any(is_red(s.colour) for s in scene.shapes):
            return "red, not a box"
        if any(isinstance(s, Box) for s in scene.shapes):
            return "box, not red"
    return "neither"


@torch.no_grad()
def composition(
    model, images, cameras, scenes: list[Scene], holdout: str, context: int, samples: int, seed: int, device
):
    """Per test scene: its group, query view, prediction errors (whole image and the objects' pixels)."""
    from gqn_fast.data.camera import FOV_DEGREES
    from gqn_fast.data.render import render

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, scene in enumerate(tqdm(scenes, desc="composition", unit="scene")):
        x, v, camera = scene_views(images, cameras, i, device)
        order = torch.randperm(x.shape[0], generator=g)
        cx, cv, qx, qv = split_views(x, v, order, context)
        pred = predict(model, cx[None], cv[None], qv[None], samples, g)
        mean_of_k, best_of_k = prediction_errors(pred, qx[None])
        # The objects' pixels (their shadows included): where the room alone looks different.
        room = render([dataclasses.replace(scene, shapes=())], camera[order[0]][None, None].cpu(), fov=FOV_DEGREES)
        room = room[0, 0].permute(2, 0, 1).to(device).float() / 255
        mask = (room != qx).any(dim=0)
        objects = (pred.mean(0)[0] - qx)[:, mask].pow(2).mean().item() if mask.any() else None
        rows.append(
            {
                "scene": i,
                "group": composition_group(scene, holdout),
                "mse_mean_of_k": mean_of_k.item(),
                "mse_best_of_k": best_of_k.item(),
                "mse_object_pixels": objects,
                "pictures": list(cx) + [None, qx, pred.mean(0)[0]],
            }
        )
    return rows


def run_composition(ns: argparse.Namespace) -> int:
    check_int("--scenes", ns.scenes, 1)
    check_int("--samples", ns.samples, 1)
    check_int("--context", ns.context, 1)
    check_int("--show", ns.show, 1)
    device, model, model_file, images, cameras, manifest = open_checkpoint(ns)
    holdout = (manifest.get("generator") or {}).get("holdout")
    if holdout is None:
        raise UsageError(
            "--data: composition needs a dataset with a held-out combination, "
            "made by `gqn-fast data make rooms --holdout red-boxes` (and a model trained on it)"
        )
    T = images.shape[1]
    check_int("--context", ns.context, 1, T - 1, f" (the data has {T} views a scene)")
    n = min(ns.scenes, images.shape[0])
    rows = composition(
        model, images, cameras, builtin_test_scenes(manifest, 0, n), holdout, ns.context, ns.samples, ns.seed, device
    )
    groups = {}
    for name in ("held-out", "red, not a box", "box, not red", "neither"):
        members = [r for r in rows if r["group"] == name]
        mean = lambda key: float(np.mean([r[key] for r in members if r[key] is not None])) if members else None
        groups[name] = {
            "scenes": len(members),
            "mse_mean_of_k": mean("mse_mean_of_k"),
            "mse_best_of_k": mean("mse_best_of_k"),
            "mse_object_pixels": mean("mse_object_pixels"),
        }
    report = {
        "checkpoint": str(ns.checkpoint),
        "step": model_file.step,
        "holdout": holdout,
        "scenes": n,
        "context_views": ns.context,
        "samples": ns.samples,
        "about": "prediction error (generate, mean of k prior samples) on test scenes; the training split never "
        "showed the held-out combination",
        "groups": groups,
        "per_scene": [{k: v for k, v in r.items() if k != "pictures"} for r in rows],
    }
    out = output_folder(ns.out, ns.checkpoint, "analyze-composition", model_file.step)
    picked = [r for name in groups for r in [r for r in rows if r["group"] == name][: ns.show]]
    # Under each row: its group below the first context view, then what the last two cells are.
    captions = [[r["group"]] + [""] * ns.context + ["target", f"mean of {ns.samples} samples"] for r in picked]
    write_report(
        out / "composition.json",
        report,
        out / "composition.png",
        lambda _, picture: save_grid([r["pictures"] for r in picked], picture, captions=captions),
    )
    for name, group in groups.items():
        if group["scenes"]:
            print(
                f"{name}: {group['scenes']} scenes, MSE {group['mse_mean_of_k']:.5f}, "
                f"on the objects' pixels {group['mse_object_pixels']}"
            )
        else:
            print(f"{name}: no test scene")
    print(
        f"wrote {out / 'composition.json'} and {out / 'composition.png'} "
        f"(rows: up to {ns.show} scenes per group in the order above; context views, truth, mean prediction)"
    )
    return 0


# --- command line ------------------------------------------------------------------------------
