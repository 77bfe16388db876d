"""`gqn-fast eval` and `gqn-fast sample`: how good a checkpoint is, in numbers and in pictures."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gqn_fast.checkpoint import CheckpointError, load_checkpoint
from gqn_fast.config import GQNConfig
from gqn_fast.images import save_gif, save_grid
from gqn_fast.reference import transform_viewpoint
from gqn_fast.schedules import bits_per_dim, nll_floor, pixel_sigma


def load_model(path: Path, device: torch.device, impl: str = "fast"):
    """(model in eval mode, checkpoint state) from a training checkpoint."""
    from gqn_fast.train import model_class

    state = load_checkpoint(path)
    config = GQNConfig.from_dict(state["config"])
    model = model_class(impl)(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state


def data_folder(state: dict, data: str | None) -> Path:
    """The dataset to read: --data, else the one the checkpoint was trained on."""
    from gqn_fast.data.builtin import builtin_dataset

    if data:
        return Path(data)
    train = state.get("train", {})
    if train.get("data"):
        return Path(train["data"])
    return builtin_dataset("rooms", scenes=train.get("builtin_scenes", 2000))


def scene_views(images: np.ndarray, cameras: np.ndarray, index: int, device):
    """A stored scene as model inputs: ([T, 3, 64, 64] floats in [0, 1], [T, 7] viewpoints)."""
    x = torch.from_numpy(np.array(images[index])).to(device)  # a copy: the memmap is read-only
    x = x.permute(0, 3, 1, 2).float() / 255
    camera = torch.from_numpy(np.array(cameras[index])).to(device)
    return x, transform_viewpoint(camera), camera


def split_views(x, v, order, views: int):
    """Query = order[0]; context = the next `views` views (never the query)."""
    context = order[1 : views + 1]
    return x[context], v[context], x[order[0]], v[order[0]]


@torch.no_grad()
def evaluate(model, images, cameras, sigma: float, max_context: int, scenes: int, batch: int, seed: int, device):
    """Test-set metrics at M = max_context, and NLL and MSE for every M in 1..max_context.

    Each scene's query and view order are drawn once from `seed`, so every M sees the same
    queries and the curve shows only the effect of more context.
    """
    n = min(scenes, images.shape[0])
    T = images.shape[1]
    if not 1 <= max_context <= T - 1:
        raise ValueError(f"max_context: expected 1..{T - 1} for {T} views per scene, got {max_context}")
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(T, generator=g) for _ in range(n)]
    curve = {M: {"nll": 0.0, "mse": 0.0, "kl": 0.0} for M in range(1, max_context + 1)}
    for start in tqdm(range(0, n, batch), desc="eval", unit="batch"):
        scenes_here = [scene_views(images, cameras, i, device)[:2] for i in range(start, min(n, start + batch))]
        for M in curve:
            parts = [split_views(x, v, orders[start + j], M) for j, (x, v) in enumerate(scenes_here)]
            cx, cv, qx, qv = (torch.stack(p) for p in zip(*parts))
            out = model.elbo(cx, cv, qx, qv, sigma=sigma)
            curve[M]["nll"] += out.nll.sum().item()
            curve[M]["kl"] += out.kl.sum().item()
            curve[M]["mse"] += (out.mean - qx).pow(2).mean(dim=(1, 2, 3)).sum().item()
    for values in curve.values():
        for key in values:
            values[key] /= n
    top = curve[max_context]
    loss = top["nll"] + top["kl"]
    return {
        "scenes": n, "sigma": sigma, "context_views": max_context,
        "neg_elbo_nats": loss, "bits_per_dim": bits_per_dim(loss), "kl_nats": top["kl"],
        "nll_nats": top["nll"], "nll_above_floor": top["nll"] - nll_floor(sigma), "mse": top["mse"],
        "curve": [{"context_views": M, **v} for M, v in curve.items()],
    }


def plot_curve(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ms = [c["context_views"] for c in metrics["curve"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(Ms, [c["nll"] - nll_floor(metrics["sigma"]) for c in metrics["curve"]], "o-")
    left.set_xlabel("context views")
    left.set_ylabel("NLL above the sigma floor (nats)")
    right.plot(Ms, [c["mse"] for c in metrics["curve"]], "o-", color="tab:orange")
    right.set_xlabel("context views")
    right.set_ylabel("MSE of the mean prediction")
    fig.suptitle("prediction error against the number of context views (the paper: falls with more views)")
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
        zeros = torch.zeros(c.L, 1, c.z_dim, 16, 16, device=device)
        mean = model.generate(cx, cv, qv, noise=zeros)[0]  # z at the prior's mean
        draws = [model.generate(cx, cv, qv)[0] for _ in range(samples)]
        written.append(save_grid([list(cx[0]), [qx, mean] + draws], out / f"scene-{i:04d}.png"))
        path_cams = fly_around(camera.cpu().float(), frames).to(device)
        qv_path = transform_viewpoint(path_cams)
        frames_out = []
        for start in range(0, frames, 16):
            qvs = qv_path[start : start + 16]
            k = qvs.shape[0]
            frames_out += list(model.generate(cx.expand(k, -1, -1, -1, -1), cv.expand(k, -1, -1), qvs))
        written.append(save_gif(frames_out, out / f"scene-{i:04d}-fly-around.gif"))
    return written


# --- command line ---------------------------------------------------------------------------


def _device(name):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _open(ns: argparse.Namespace, command: str):
    """(device, model, checkpoint state, test images, test cameras), or None after saying why."""
    from gqn_fast.data.format import DatasetFormatError, open_split

    device = _device(ns.device)
    try:
        model, state = load_model(Path(ns.checkpoint), device)
        images, cameras, _ = open_split(data_folder(state, ns.data) / "test")
    except (CheckpointError, DatasetFormatError, FileNotFoundError) as error:
        print(f"gqn-fast {command}: {error}")
        return None
    return device, model, state, images, cameras


def run_eval(ns: argparse.Namespace) -> int:
    opened = _open(ns, "eval")
    if opened is None:
        return 1
    device, model, state, images, cameras = opened
    K = ns.max_context or images.shape[1] - 1
    sigma = pixel_sigma(state["step"], state.get("train", {}).get("sigma_steps", 200_000))
    metrics = evaluate(model, images, cameras, sigma, K, ns.scenes, ns.batch, ns.seed, device)
    out = Path(ns.out) if ns.out else Path(ns.checkpoint).parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curve(metrics, out / "context_curve.png")
    print(
        f"step {state['step']}: -ELBO {metrics['neg_elbo_nats']:.1f} nats/image "
        f"({metrics['bits_per_dim']:.4f} bits/dim), KL {metrics['kl_nats']:.2f}, "
        f"NLL above floor {metrics['nll_above_floor']:.1f}, MSE {metrics['mse']:.5f} "
        f"over {metrics['scenes']} scenes; wrote {out / 'metrics.json'} and {out / 'context_curve.png'}"
    )
    return 0


def run_sample(ns: argparse.Namespace) -> int:
    opened = _open(ns, "sample")
    if opened is None:
        return 1
    device, model, _, images, cameras = opened
    out = Path(ns.out) if ns.out else Path(ns.checkpoint).parent.parent / "samples"
    context = min(ns.context, images.shape[1] - 1)
    files = sample(model, images, cameras, out, ns.scenes, ns.samples, context, ns.frames, ns.seed, device)
    print(f"wrote {len(files)} files to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="test-set ELBO, bits/dim, MSE, and the context-views curve")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset folder (default: the one the checkpoint trained on)")
    p.add_argument("--scenes", type=int, default=1000, help="test scenes to use at most")
    p.add_argument("--max-context", type=int, help="K: the curve covers 1..K views (default T - 1)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for metrics.json and context_curve.png")
    p.add_argument("--device")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("sample", help="pictures of held-out scenes and fly-around GIFs")
    p.add_argument("checkpoint")
    p.add_argument("--data")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--samples", type=int, default=4, help="prior samples per scene")
    p.add_argument("--context", type=int, default=5, help="context views per scene")
    p.add_argument("--frames", type=int, default=36, help="frames of the fly-around")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the pictures")
    p.add_argument("--device")
    p.set_defaults(func=run_sample)
