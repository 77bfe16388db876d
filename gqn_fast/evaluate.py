"""`gqn-fast eval` and `gqn-fast sample`: how good a checkpoint is, in numbers and in pictures.

Two kinds of number, never mixed up:
- reconstruction: the ELBO's terms (NLL, KL) and the MSE of the posterior's mean image. The
  posterior reads the query image, so these say how well the model encodes a view it is shown.
- prediction: images drawn with `generate` (z from the prior), compared with the query image
  afterwards. Nothing that makes them reads the query image: this is what the model predicts
  of a view it has not seen, and what the paper shows improving with more context views.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gqn_fast.config import GRID_SIZE
from gqn_fast.consistency import consistency_metrics, consistency_sums
from gqn_fast.consistency import targets as consistency_targets
from gqn_fast.data.format import write_json_atomic
from gqn_fast.devices import device_of
from gqn_fast.errors import Interrupted, UsageError, check_int
from gqn_fast.images import save_gif, save_grid
from gqn_fast.model_file import PUBLISHED_NAME, ModelFile, pixel_sigma_of, read_model_file, write_published
from gqn_fast.models import build_model
from gqn_fast.reference import transform_viewpoint
from gqn_fast.schedules import bits_per_dim, nll_floor
from gqn_fast.train_settings import TrainArgs

RECONSTRUCTION = "ELBO terms: the posterior reads the query image (how well a shown view is encoded)"
PREDICTION = "generate: z from the prior, the query image is never read (how well an unseen view is predicted)"


def load_model(path: Path, device: torch.device, impl: str = "fast"):
    """(model in eval mode, ModelFile) from a published model or a training checkpoint (model_file.py)."""
    model_file = read_model_file(path)
    model = build_model(model_file.config, impl).to(device)
    model.load_state_dict(model_file.params)  # names and shapes checked already
    return model.eval(), model_file


def data_folder(model_file: ModelFile, data: str | None) -> Path:
    """The dataset to read: --data, else the one the model was trained on (a built-in set is
    generated again: the generator is deterministic)."""
    from gqn_fast.data.builtin import builtin_dataset

    if data:
        return Path(data)
    if "folder" in model_file.dataset:
        return Path(model_file.dataset["folder"])
    builtin = model_file.dataset["builtin"]
    return builtin_dataset(
        builtin["family"], scenes=builtin["scenes"], seed=builtin["seed"], holdout=builtin["holdout"]
    )


def scene_views(images: np.ndarray, cameras: np.ndarray, index: int, device):
    """A stored scene as model inputs: ([T, 3, 64, 64] floats in [0, 1], [T, 7] viewpoints, [T, 5] cameras)."""
    x = torch.from_numpy(np.array(images[index])).to(device)  # a copy: the memmap is read-only
    x = x.permute(0, 3, 1, 2).float() / 255
    camera = torch.from_numpy(np.array(cameras[index])).to(device)
    return x, transform_viewpoint(camera), camera


def split_views(x, v, order, views: int):
    """Query = order[0]; context = the next `views` views (never the query)."""
    context = order[1 : views + 1]
    return x[context], v[context], x[order[0]], v[order[0]]


def standard_normal(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[L, batch, z_dim, 16, 16] draws for a model's `noise` argument, from `generator` (CPU)."""
    c = model.config
    return torch.randn(c.L, batch, c.z_dim, GRID_SIZE, GRID_SIZE, generator=generator)


@torch.no_grad()
def predict(model, context_x, context_v, query_v, samples: int, generator: torch.Generator) -> torch.Tensor:
    """[samples, B, 3, 64, 64]: `samples` images per query drawn by `generate` (z from the prior).

    Takes no query image, so a prediction cannot depend on one. The noise comes from
    `generator` (on the CPU), never the global RNG, so evaluating leaves training's RNG alone.
    """
    return draw_samples(
        model,
        query_v,
        samples,
        generator,
        lambda repeat, noise: model.generate(repeat(context_x), repeat(context_v), repeat(query_v), noise=noise),
    )


def draw_samples(model, query_v, samples: int, generator: torch.Generator, draw) -> torch.Tensor:
    """[samples, B, 3, 64, 64] from draw(repeat, noise), which renders all samples of all B queries
    at once: `repeat` tiles a [B, ...] input sample-major ([samples * B, ...]), and `noise` holds
    their draws from `generator`."""
    noise = standard_normal(model, samples * query_v.shape[0], generator).to(query_v.device, query_v.dtype)
    repeat = lambda t: t.repeat(samples, *([1] * (t.dim() - 1)))
    images = draw(repeat, noise)
    return images.view(samples, query_v.shape[0], *images.shape[1:])


def prediction_errors(predictions: torch.Tensor, query_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene ([B] each): the MSE of the mean of the k predictions, and the smallest MSE of one of them."""
    mean_of_k = (predictions.mean(0) - query_x).pow(2).mean(dim=(1, 2, 3))
    best_of_k = (predictions - query_x).pow(2).mean(dim=(2, 3, 4)).min(0).values
    return mean_of_k, best_of_k


@torch.no_grad()
def evaluate(
    model, images, cameras, sigma: float, max_context: int, scenes: int, batch: int, samples: int, seed: int, device
):
    """Reconstruction (ELBO terms) and prediction (generate) errors for every M in 1..max_context.

    Each scene's query and view order are drawn once from `seed`, so every M sees the same
    queries and the curve shows only the effect of more context. All noise comes from `seed`
    too: the same call gives the same numbers, and the global RNG is left alone.
    """
    T = images.shape[1]
    if not 1 <= max_context <= T - 1:
        raise ValueError(f"max_context: expected 1..{T - 1} for {T} views per scene, got {max_context}")
    for name, value in (("scenes", scenes), ("batch", batch), ("samples", samples)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value}")
    n = min(scenes, images.shape[0])
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(T, generator=g) for _ in range(n)]
    noise = torch.Generator().manual_seed(seed)
    keys = ("nll", "kl", "mse", "mse_mean_of_k", "mse_best_of_k")
    sums = {M: dict.fromkeys(keys, 0.0) for M in range(1, max_context + 1)}
    with tqdm(total=math.ceil(n / batch) * max_context, desc="eval", unit="batch") as bar:
        for start in range(0, n, batch):
            scenes_here = [scene_views(images, cameras, i, device)[:2] for i in range(start, min(n, start + batch))]
            for M, total in sums.items():
                parts = [split_views(x, v, orders[start + j], M) for j, (x, v) in enumerate(scenes_here)]
                cx, cv, qx, qv = (torch.stack(p) for p in zip(*parts))
                eps = standard_normal(model, qx.shape[0], noise).to(device)
                out = model.elbo(cx, cv, qx, qv, sigma=sigma, noise=eps)
                total["nll"] += out.nll.sum().item()
                total["kl"] += out.kl.sum().item()
                total["mse"] += (out.mean - qx).pow(2).mean(dim=(1, 2, 3)).sum().item()
                mean_of_k, best_of_k = prediction_errors(predict(model, cx, cv, qv, samples, noise), qx)
                total["mse_mean_of_k"] += mean_of_k.sum().item()
                total["mse_best_of_k"] += best_of_k.sum().item()
                bar.update(1)
    curve = []
    for M, total in sums.items():
        mean = {key: value / n for key, value in total.items()}
        loss = mean["nll"] + mean["kl"]
        curve.append(
            {
                "context_views": M,
                "reconstruction": {
                    "neg_elbo_nats": loss,
                    "bits_per_dim": bits_per_dim(loss),
                    "kl_nats": mean["kl"],
                    "nll_nats": mean["nll"],
                    "nll_above_floor": mean["nll"] - nll_floor(sigma),
                    "mse": mean["mse"],
                },
                "prediction": {"mse_mean_of_k": mean["mse_mean_of_k"], "mse_best_of_k": mean["mse_best_of_k"]},
            }
        )
    top = curve[-1]
    metrics = {
        "scenes": n,
        "sigma": sigma,
        "context_views": max_context,
        "prediction_samples": samples,
        "seed": seed,
        "about": {"reconstruction": RECONSTRUCTION, "prediction": PREDICTION},
        "reconstruction": top["reconstruction"],
        "prediction": top["prediction"],
        "curve": curve,
    }
    if model.config.model == "jump":
        latents = max(samples, 2)  # two at least: a latent is compared with an independent one
        metrics["consistency"] = consistency(model, images, cameras, orders, max_context, batch, latents, seed, device)
    return metrics


@torch.no_grad()
def consistency(model, images, cameras, orders, context: int, batch: int, latents: int, seed: int, device) -> dict:
    """How the views drawn from one scene latent agree (gqn_fast.consistency), each scene with its
    query and `context` views as `evaluate` drew them; noise of its own from `seed`."""
    noise = torch.Generator().manual_seed(seed)
    n, sums = len(orders), []
    for start in range(0, n, batch):
        parts = []
        for i in range(start, min(n, start + batch)):
            x, v, camera = scene_views(images, cameras, i, device)
            cx, cv, _, _ = split_views(x, v, orders[i], context)
            parts.append((cx, cv, camera[orders[i][0]]))
        cx, cv, query_camera = (torch.stack(p) for p in zip(*parts))
        views = consistency_targets(query_camera)

        def draw(repeat, eps):
            return model.render(model.sample_latent(repeat(cx), repeat(cv), noise=eps), repeat(views))

        sums.append(consistency_sums(draw_samples(model, query_camera, latents, noise, draw)))
    return consistency_metrics(sums, n, latents)


def plot_curve(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = metrics["curve"]
    Ms = [c["context_views"] for c in curve]
    k = metrics["prediction_samples"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(Ms, [c["prediction"]["mse_mean_of_k"] for c in curve], "o-", label=f"mean of {k} samples")
    left.plot(Ms, [c["prediction"]["mse_best_of_k"] for c in curve], "s--", label=f"best of {k} samples")
    left.set_title("prediction (generate; never sees the query)", fontsize=10)
    left.set_ylabel("MSE against the unseen query view")
    left.legend()
    right.plot(
        Ms,
        [c["reconstruction"]["nll_above_floor"] for c in curve],
        "o-",
        color="tab:green",
        label="NLL above the sigma floor",
    )
    right.plot(Ms, [c["reconstruction"]["kl_nats"] for c in curve], "s--", color="tab:red", label="KL")
    right.set_title("reconstruction (ELBO terms; the posterior sees the query)", fontsize=10)
    right.set_ylabel("nats per image")
    right.legend()
    for ax in (left, right):
        ax.set_xlabel("context views M")
        ax.set_xticks(Ms)
    fig.suptitle(f"{metrics['scenes']} test scenes, sigma {metrics['sigma']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fly_around(cameras: torch.Tensor, frames: int) -> torch.Tensor:
    """[frames, 5] cameras on the circle the scene's cameras lie on (z up), looking as they do."""
    from gqn_fast.data.camera import look_at

    radius = cameras[:, :2].norm(dim=1).mean()
    height = cameras[:, 2].mean()
    # Aim at the height the scene's own cameras aim at, at the circle's centre.
    target_z = height + radius * torch.tan(cameras[:, 4].mean())
    angles = torch.linspace(0, 2 * math.pi, frames + 1)[:-1]
    positions = torch.stack([radius * angles.cos(), radius * angles.sin(), height.expand(frames)], dim=1)
    return look_at(positions, torch.stack([torch.zeros(()), torch.zeros(()), target_z]))


@torch.no_grad()
def sample(model, images, cameras, out: Path, scenes: int, samples: int, context: int, frames: int, seed: int, device):
    """A PNG per scene (context, truth, mean, samples) and a fly-around GIF per scene."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    g = torch.Generator().manual_seed(seed)
    c = model.config
    for i in tqdm(range(min(scenes, images.shape[0])), desc="sample", unit="scene"):
        x, v, camera = scene_views(images, cameras, i, device)
        order = torch.randperm(x.shape[0], generator=g)
        cx, cv, qx, qv = split_views(x, v, order, context)
        cx, cv, qv = cx[None], cv[None], qv[None]
        zeros = torch.zeros(c.L, 1, c.z_dim, GRID_SIZE, GRID_SIZE, device=device)
        mean = model.generate(cx, cv, qv, noise=zeros)[0]  # z at the prior's mean
        draws = list(predict(model, cx, cv, qv, samples, g)[:, 0]) if samples else []
        captions = [
            [f"context {k + 1}" for k in range(cx.shape[1])],
            ["target", "z = 0 (prior mean)"] + [f"prior sample {k + 1}" for k in range(len(draws))],
        ]
        written.append(save_grid([list(cx[0]), [qx, mean] + draws], out / f"scene-{i:04d}.png", captions=captions))
        qv_path = transform_viewpoint(fly_around(camera.cpu().float(), frames).to(device))
        frames_out = []
        for start in range(0, frames, 16):
            qvs = qv_path[start : start + 16]
            k = qvs.shape[0]
            frames_out += list(predict(model, cx.expand(k, -1, -1, -1, -1), cv.expand(k, -1, -1), qvs, 1, g)[0])
        written.append(save_gif(frames_out, out / f"scene-{i:04d}-fly-around.gif"))
    return written


# --- command line (shared with gqn_fast.analyze) --------------------------------------------


def open_checkpoint(ns: argparse.Namespace):
    """(device, model, ModelFile, test images, test cameras, test manifest) for a command: the
    images and cameras indexed by scene, from a converted folder or DeepMind's download."""
    from gqn_fast.data.folder import open_dataset, scene_arrays

    device = device_of(ns.device)
    model, model_file = load_model(Path(ns.checkpoint), device)
    name = ns.dataset or model_file.training.get("dataset")  # a download's set, where its folder does not say
    images, cameras, manifest = scene_arrays(open_dataset(data_folder(model_file, ns.data), "test", name))
    return device, model, model_file, images, cameras, manifest


RESULTS_ROOT = Path("runs")  # where the results of a model outside a run folder go (git ignores it)


def run_folder(checkpoint: Path) -> Path:
    """Where a model's results go: the training run a checkpoint belongs to
    (<run>/checkpoints/step-*.pt); else runs/<name> under the current folder, <name> the
    model's folder (models/NAME/model.safetensors, or a folder given as the model) or file
    stem, so that nothing is written beside a published model."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    if checkpoint.is_dir():
        return RESULTS_ROOT / checkpoint.resolve().name
    name = checkpoint.resolve().parent.name if checkpoint.name == PUBLISHED_NAME else checkpoint.stem
    return RESULTS_ROOT / name


def output_folder(out: str | None, checkpoint: Path, kind: str, step: int) -> Path:
    """--out when given; else a new folder <run>/<kind>/step-<step>[-2, -3, ...], so that no
    result ever overwrites an earlier one."""
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    parent = run_folder(checkpoint) / kind
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (f"step-{step:08d}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()  # exclusive: two evaluations at once get two folders
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{parent}: holds 10000 results for step {step} already; pass --out")


def write_report(path: Path, report: dict, picture: Path, draw) -> None:
    """A command's results: `report` as JSON at `path` (whole or not at all), then its picture,
    `draw(report, picture)`. A Ctrl-C on the way leaves no half-drawn picture and says what was kept."""
    written = False
    try:
        write_json_atomic(path, report)
        written = True
        draw(report, picture)
    except KeyboardInterrupt:
        picture.unlink(missing_ok=True)
        if written:
            raise Interrupted(f"kept {path}; its picture was not drawn") from None
        raise


def run_eval(ns: argparse.Namespace) -> int:
    check_int("--scenes", ns.scenes, 1)
    check_int("--batch", ns.batch, 1)
    check_int("--samples", ns.samples, 1)
    device, model, model_file, images, cameras, _ = open_checkpoint(ns)
    T = images.shape[1]
    K = (
        T - 1
        if ns.max_context is None
        else check_int("--max-context", ns.max_context, 1, T - 1, f" (the data has {T} views a scene)")
    )
    sigma = pixel_sigma_of(model_file)
    metrics = evaluate(model, images, cameras, sigma, K, ns.scenes, ns.batch, ns.samples, ns.seed, device)
    metrics["checkpoint"], metrics["step"] = str(ns.checkpoint), model_file.step
    out = output_folder(ns.out, ns.checkpoint, "eval", model_file.step)
    write_report(out / "metrics.json", metrics, out / "context_curve.png", plot_curve)
    rec, pred, first = metrics["reconstruction"], metrics["prediction"], metrics["curve"][0]["prediction"]
    print(
        f"step {model_file.step}, {metrics['scenes']} test scenes, {K} context views:\n"
        f"  reconstruction (sees the query): -ELBO {rec['neg_elbo_nats']:.1f} nats/image "
        f"({rec['bits_per_dim']:.4f} bits/dim), KL {rec['kl_nats']:.2f}, NLL above floor {rec['nll_above_floor']:.1f}, "
        f"MSE {rec['mse']:.5f}\n"
        f"  prediction (generate, {ns.samples} samples): MSE of the mean {pred['mse_mean_of_k']:.5f} "
        f"(1 view: {first['mse_mean_of_k']:.5f}), best of {ns.samples} {pred['mse_best_of_k']:.5f}\n"
        + consistency_line(metrics.get("consistency"))
        + f"wrote {out / 'metrics.json'} and {out / 'context_curve.png'}"
    )
    return 0


def consistency_line(metrics: dict | None) -> str:
    """eval's printed line on a Consistent GQN's consistency (gqn_fast.consistency); '' without one."""
    if metrics is None:
        return ""
    same, near = metrics["identical_view"], metrics["nearby_view"]
    agreement = "n/a" if near["agreement"] is None else f"{near['agreement']:.3f}"
    return (
        f"  consistency ({metrics['latents']} latents a scene): a view rendered twice from one z differs by at most "
        f"{same['same_z_max_abs_diff']:.2g} (from independent z's: MSE {same['independent_z_mse']:.5f}); "
        f"turned {metrics['yaw_rad']} rad: MSE {near['same_z_mse']:.5f} from one z, "
        f"{near['independent_z_mse']:.5f} from independent z's, agreement {agreement}\n"
    )


def run_sample(ns: argparse.Namespace) -> int:
    check_int("--scenes", ns.scenes, 1)
    check_int("--samples", ns.samples, 0)
    check_int("--frames", ns.frames, 1)
    check_int("--context", ns.context, 1)
    device, model, model_file, images, cameras, _ = open_checkpoint(ns)
    T = images.shape[1]
    check_int("--context", ns.context, 1, T - 1, f" (the data has {T} views a scene)")
    out = output_folder(ns.out, ns.checkpoint, "samples", model_file.step)
    try:
        files = sample(model, images, cameras, out, ns.scenes, ns.samples, ns.context, ns.frames, ns.seed, device)
    except KeyboardInterrupt:
        raise Interrupted(f"the pictures written so far are kept in {out}") from None
    print(f"wrote {len(files)} files to {out}")
    return 0


def run_export(ns) -> int:
    import dataclasses

    from gqn_fast.data.folder import DOWNLOAD, inspect_folder
    from gqn_fast.data.format import open_split

    model_file = read_model_file(Path(ns.checkpoint))
    out = Path(ns.out)
    if out.suffix != ".safetensors":  # a model folder, as Hugging Face lays them out
        out = out / PUBLISHED_NAME
    folder = model_file.dataset.get("folder")
    name = model_file.training.get("dataset")
    if folder and not ns.keep_data_path and inspect_folder(folder, name).kind != DOWNLOAD:
        # A built-in set is named by its generator, so the model needs no local folder.
        try:
            _, _, manifest = open_split(Path(folder) / "test")
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(
                f"{folder}: the training data cannot be read to name it ({error}); "
                "pass --keep-data-path to keep the path as it is"
            ) from error
        generator = manifest.get("generator") or {}
        if "family" in generator:
            # The set regenerated is of the run's --builtin-scenes: its test split is the first of the folder's.
            scenes = model_file.training.get("builtin_scenes", TrainArgs.builtin_scenes)
            builtin = {k: generator.get(k) for k in ("family", "seed", "holdout")}
            model_file = dataclasses.replace(model_file, dataset={"builtin": {**builtin, "scenes": scenes}})
    write_published(out, model_file, half=ns.half)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB, step {model_file.step}, dataset {json.dumps(model_file.dataset)})")
    return 0
