"""`gqn-fast train`: the training loop (nanoGPT-style: one readable loop, schedules as pure
functions, checkpoints holding everything needed to continue exactly).

Several GPUs: `torchrun --nproc_per_node N -m gqn_fast train ...` (DistributedDataParallel;
logging, pictures and checkpoints on rank 0 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gqn_fast.checkpoint import (
    CheckpointError, check_compatible, list_checkpoints, load_checkpoint, rng_state,
    save_checkpoint, set_rng_state,
)
from gqn_fast.config import GQNConfig
from gqn_fast.images import save_grid
from gqn_fast.schedules import bits_per_dim, learning_rate, nll_floor, pixel_sigma


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainArgs:
    data: str | None = None
    builtin_scenes: int = 2000
    preset: str = "small"
    steps: int = 2000
    sigma_steps: int = 200_000
    batch: int = 16
    max_context: int = 5
    impl: str = "fast"
    precision: str = "fp32"
    compile: bool = False
    out: str = "runs/gqn"
    resume: bool = False
    seed: int = 0
    workers: int = 0
    log_every: int = 10
    image_every: int = 500
    checkpoint_every: int = 250
    keep: int = 3
    device: str | None = None


def model_class(impl: str):
    if impl == "reference":
        from gqn_fast.reference import GQN
    elif impl == "fast":
        from gqn_fast.model import GQN
    else:
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
    return GQN


# --- distributed ----------------------------------------------------------------------------


def setup_distributed(requested_device: str | None):
    """(rank, world size, device). torchrun sets WORLD_SIZE; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and requested_device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        return dist.get_rank(), world, device
    device = torch.device(requested_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return 0, 1, device


# --- one run --------------------------------------------------------------------------------


def train(args: TrainArgs) -> torch.nn.Module:
    """Train per `args`; returns the (unwrapped) model. Raises TrainingDiverged on NaN/inf."""
    from gqn_fast.data.builtin import builtin_dataset
    from gqn_fast.data.loader import make_loader, to_model_inputs

    rank, world, device = setup_distributed(args.device)
    main = rank == 0
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    config = GQNConfig.preset(args.preset)
    if args.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {args.precision!r}")

    data_root = Path(args.data) if args.data else builtin_dataset("rooms", scenes=args.builtin_scenes)
    torch.manual_seed(args.seed)
    model = model_class(args.impl)(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate(0), betas=(0.9, 0.999), eps=1e-8)
    step, epoch, batch_in_epoch = 0, 0, 0

    existing = list_checkpoints(ckpt_dir)
    if existing and not args.resume:
        raise CheckpointError(
            f"{ckpt_dir} already holds checkpoints; pass --resume to continue, or another --out"
        )
    if args.resume and existing:
        state = load_checkpoint(existing[-1])
        check_compatible(state, config, existing[-1])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["data"]["epoch"], state["data"]["batch"]
        if main:
            tqdm.write(f"resumed from {existing[-1]} at step {step}")

    elbo = model  # calling a GQN computes its ELBO
    if world > 1:
        elbo = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        elbo = torch.compile(elbo)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    )

    loader = make_loader(
        data_root, "train", batch_size=args.batch, max_context=args.max_context, seed=args.seed,
        num_workers=args.workers, distributed=world > 1,
    )

    writer = MetricsWriter(out) if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"model": config.to_dict(), "train": dataclasses.asdict(args)}, indent=1))
    progress = tqdm(total=args.steps, initial=step, disable=not main, dynamic_ncols=True, desc="train")

    def checkpoint():
        if main:
            save_checkpoint(ckpt_dir, step, dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), rng=rng_state(),
                data=dict(epoch=epoch, batch=batch_in_epoch), config=config.to_dict(),
                train=dataclasses.asdict(args),
            ), keep=args.keep)
        if world > 1:
            dist.barrier()

    loader.set_epoch(epoch, start_batch=batch_in_epoch)
    batches = iter(loader)
    window_start, window_steps = time.perf_counter(), 0
    sums = None
    try:
        while step < args.steps:
            try:
                batch = next(batches)
            except StopIteration:
                epoch, batch_in_epoch = epoch + 1, 0
                loader.set_epoch(epoch)
                batches = iter(loader)
                continue
            context_x, context_v, query_x, query_v = to_model_inputs(batch, device)
            sigma = pixel_sigma(step, args.sigma_steps)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            with autocast:
                result = elbo(context_x, context_v, query_x, query_v, sigma=sigma)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            step, batch_in_epoch, window_steps = step + 1, batch_in_epoch + 1, window_steps + 1
            progress.update(1)

            # Metrics stay on the device between logs, so the GPU is not waited on every step.
            kl = result.kl.detach().sum(1).mean().float()
            nll = result.nll.detach().mean().float()
            now = torch.stack([result.loss.detach().float(), nll, kl])
            sums = now if sums is None else sums + now
            last_log = step % args.log_every == 0 or step == args.steps
            last_ckpt = step % args.checkpoint_every == 0 or step == args.steps
            if last_log or last_ckpt:
                loss, nll_v, kl_v = (sums / window_steps).tolist()
                # The loss is of the parameters before this step's update; a checkpoint holds
                # those after it, so they are checked too before one is written.
                finite = all(math.isfinite(v) for v in (loss, nll_v, kl_v))
                if finite and last_ckpt:
                    finite = bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())
                if not finite:
                    good = list_checkpoints(ckpt_dir)
                    where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"the loss or the weights became NaN or infinite by step {step} "
                        f"(mean loss {loss:.4g}, sigma {sigma:.3f}, lr {learning_rate(step - 1):.2e}); "
                        f"{where}. Try a lower learning rate or --precision fp32."
                    )
                rate = window_steps / (time.perf_counter() - window_start)
                record = dict(step=step, loss=loss, nll=nll_v, kl=kl_v, nll_above_floor=nll_v - nll_floor(sigma),
                              bits_per_dim=bits_per_dim(loss), sigma=sigma, lr=learning_rate(step - 1),
                              steps_per_s=rate, epoch=epoch)
                if main:
                    writer.write(record)
                    progress.set_postfix(loss=f"{loss:.0f}", bpd=f"{record['bits_per_dim']:.3f}", kl=f"{kl_v:.1f}",
                                         nll_above_floor=f"{record['nll_above_floor']:.0f}", steps_s=f"{rate:.2f}")
                sums, window_start, window_steps = None, time.perf_counter(), 0
                if last_ckpt:
                    checkpoint()
            if main and (step % args.image_every == 0 or step == args.steps):
                save_progress_picture(model, (context_x, context_v, query_x, query_v), result.mean,
                                      out / "images" / f"step-{step:08d}.png")
    except KeyboardInterrupt:
        # Nothing lost on Ctrl-C: keep the state reached so far (it is finite: it was just checked
        # or is one step past a finite check, which the next log will catch on resume).
        if main:
            tqdm.write(f"interrupted at step {step}; writing a checkpoint so --resume continues here")
        checkpoint()
        raise
    finally:
        progress.close()
        if writer:
            writer.close()
    return model


def save_progress_picture(model, batch, reconstruction, path: Path, scenes: int = 4) -> None:
    """Rows: a scene's context views, its target, the reconstruction, and a prior sample."""
    context_x, context_v, query_x, query_v = (t[:scenes] for t in batch)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sample = model.generate(context_x, context_v, query_v)
    model.train(was_training)
    rows = []
    for i in range(context_x.shape[0]):
        rows.append(list(context_x[i]) + [None, query_x[i], reconstruction[i].float(), sample[i].float()])
    save_grid(rows, path)


class MetricsWriter:
    """metrics.jsonl in the run folder, and TensorBoard when it is installed."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.board = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.board:
            self.board.close()


# --- command line ---------------------------------------------------------------------------


def register(subparsers) -> None:
    defaults = TrainArgs()
    p = subparsers.add_parser("train", help="train a GQN (on the built-in rooms set unless --data)")
    p.add_argument("--data", help="dataset folder (default: the built-in rooms set, generated on first use)")
    p.add_argument("--builtin-scenes", type=int, default=defaults.builtin_scenes,
                   help="size of the built-in rooms set used without --data (made once, then cached)")
    p.add_argument("--preset", choices=["small", "paper"], default=defaults.preset)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch, help="scenes per step (per process)")
    p.add_argument("--sigma-steps", type=int, default=defaults.sigma_steps,
                   help="steps over which the pixel sigma anneals from 2.0 to 0.7 (the paper: 200000; "
                        "a short run learns little at sigma 2)")
    p.add_argument("--max-context", type=int, default=defaults.max_context, help="context views drawn from 1..K")
    p.add_argument("--impl", choices=["fast", "reference"], default=defaults.impl)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=defaults.precision)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=defaults.out, help="run folder: checkpoints, metrics, pictures")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workers", type=int, default=defaults.workers, help="data loader processes")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--image-every", type=int, default=defaults.image_every)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--keep", type=int, default=defaults.keep, help="checkpoints kept")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU if there is one)")
    p.set_defaults(func=run_command)


def run_command(ns: argparse.Namespace) -> int:
    args = TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})
    for name in ("steps", "batch", "sigma_steps", "builtin_scenes", "max_context", "log_every", "image_every", "checkpoint_every", "keep"):
        if getattr(args, name) < 1:
            raise SystemExit(f"gqn-fast train: --{name.replace('_', '-')} must be at least 1")
    try:
        train(args)
    except (TrainingDiverged, CheckpointError) as error:
        print(f"gqn-fast train: {error}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
