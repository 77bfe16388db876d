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
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gqn_fast.checkpoint import (
    CheckpointError, check_compatible, check_resumable, list_checkpoints, load_checkpoint, remove_stale_temporaries,
    rng_state, save_checkpoint, set_rng_state,
)
from gqn_fast.config import GRID_SIZE, GQNConfig
from gqn_fast.devices import device_of
from gqn_fast.errors import UsageError, UserError
from gqn_fast.images import save_grid
from gqn_fast.schedules import bits_per_dim, learning_rate, nll_floor, pixel_sigma
from gqn_fast.train_step import TrainStep, make_optimizer
from gqn_fast.train_settings import TrainArgs, check_args, check_resume_settings  # noqa: F401  (TrainArgs: the API)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


def model_class(impl: str):
    if impl == "reference":
        from gqn_fast.reference import GQN
    elif impl == "fast":
        from gqn_fast.model import GQN
    else:
        raise ValueError(f"impl: expected 'fast' or 'reference', got {impl!r}")
    return GQN


def step_mode(args: TrainArgs, device: torch.device, world: int) -> str:
    """How the step runs (gqn_fast.train_step): replayed from CUDA graphs on one CUDA device,
    unless --no-cuda-graphs, --compile or several processes (DDP's hooks run eagerly)."""
    if device.type == "cuda" and args.cuda_graphs and not args.compile and world == 1:
        return "graphed"
    return "eager"


def mode_reason(args: TrainArgs, world: int) -> str:
    if not args.cuda_graphs:
        return "--no-cuda-graphs"
    if args.compile:
        return "--compile"
    return f"{world} processes: DDP's hooks are not graphed here"


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
    return 0, 1, device_of(requested_device)


class StopAtBoundary:
    """While active, Ctrl-C asks the loop to stop at the next step boundary, where the state is
    whole and can be checkpointed; a second Ctrl-C raises KeyboardInterrupt at once.
    Only in a single-process run's main thread: DDP ranks would see it at different steps."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested, self.previous = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.default_int_handler)


# --- one run --------------------------------------------------------------------------------


def train(args: TrainArgs) -> torch.nn.Module:
    """Train per `args`; returns the (unwrapped) model. Raises TrainingDiverged on NaN/inf,
    UsageError / CheckpointError / DatasetFormatError on arguments, runs or data it cannot use
    (all checked before anything in the run folder is written)."""
    from gqn_fast.data.builtin import builtin_dataset
    from gqn_fast.data.format import write_json_atomic
    from gqn_fast.data.loader import SceneDataset, make_loader

    check_args(args)
    if args.data:  # stored absolute, so a resume or an eval from another folder finds it
        args = dataclasses.replace(args, data=str(Path(args.data).resolve()))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    main = rank == 0
    if args.max_minutes is not None and world > 1:
        raise UsageError("--max-minutes: a single-process run only (several processes would stop at different steps)")
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    config = GQNConfig.preset(args.preset)

    existing = list_checkpoints(ckpt_dir)
    if existing and not args.resume:
        raise CheckpointError(
            f"{ckpt_dir} already holds checkpoints; pass --resume to continue, or another --out"
        )
    if args.resume and not existing:
        raise UsageError(
            f"--resume: {ckpt_dir} holds no checkpoint to resume from; leave out --resume to start a new run there"
        )
    state = None
    if args.resume:
        state = load_checkpoint(existing[-1])
        check_resumable(state, existing[-1])
        check_resume_settings(state.get("train", {}), args, existing[-1])
        check_compatible(state, config, existing[-1])

    data_root = Path(args.data) if args.data else builtin_dataset("rooms", scenes=args.builtin_scenes)
    dataset = SceneDataset(data_root, "train")
    if args.max_context > dataset.num_views - 1:
        raise UsageError(
            f"--max-context: at most T - 1 = {dataset.num_views - 1} for {data_root} (one of its "
            f"{dataset.num_views} views is the query), got {args.max_context}"
        )
    if args.batch > dataset.num_scenes // world:  # DistributedSampler's share with drop_last
        per = f" per process ({world} processes)" if world > 1 else ""
        raise UsageError(
            f"--batch: {args.batch} is more than the {dataset.num_scenes // world} training scenes{per} "
            f"of {data_root}"
        )

    torch.manual_seed(args.seed)
    model = model_class(args.impl)(config).to(device)
    mode = step_mode(args, device, world)
    optimizer = make_optimizer(model, device, learning_rate(0), graphed=mode == "graphed")
    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["data"]["epoch"], state["data"]["batch"]
    saved_step = step if state is not None else None  # the step the newest checkpoint holds

    elbo = model  # calling a GQN computes its ELBO
    if world > 1:
        elbo = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        from gqn_fast.model import compile_options

        elbo = torch.compile(elbo, options=compile_options(model))

    loader = make_loader(
        dataset, "train", batch_size=args.batch, max_context=args.max_context, seed=args.seed,
        num_workers=args.workers, distributed=world > 1,
    )
    # An allowed change of --batch or --data can leave the old position past the epoch's end.
    loader.set_epoch(epoch, start_batch=min(batch_in_epoch, len(loader)))

    # Everything is checked: from here on the run folder is written.
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(ckpt_dir):
            tqdm.write(f"removed {stale}, left by a checkpoint write that was killed")
        write_json_atomic(out / "config.json", {"model": config.to_dict(), "train": dataclasses.asdict(args)})
        writer = MetricsWriter(out, start_step=step)
        if state is not None:
            tqdm.write(f"resumed from {existing[-1]} at step {step}")
    progress = tqdm(total=args.steps, initial=step, disable=not main, dynamic_ncols=True, desc="train")

    def checkpoint(rng):
        nonlocal saved_step
        if main:
            save_checkpoint(ckpt_dir, step, dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), rng=rng,
                data=dict(epoch=epoch, batch=batch_in_epoch), config=config.to_dict(),
                train=dataclasses.asdict(args),
                # The log window under way (a Ctrl-C or --max-minutes stops between two logs): a
                # resume goes on summing it, so its record is the one the unstopped run writes.
                window=dict(sums=None if sums is None else sums.cpu(), steps=window_steps),
            ), keep=args.keep)
        saved_step = step
        if world > 1:
            dist.barrier()

    train_step = TrainStep(model, optimizer, device, args.precision, mode, elbo=elbo)
    if main and device.type == "cuda" and mode != "graphed":
        tqdm.write(f"training eagerly on {device} ({mode_reason(args, world)}): each step waits on Python")
    contention = ContentionWatch(torch.get_num_threads() if device.type == "cpu" else 1)
    batches = iter(loader)
    window_start, window_steps, sums = time.perf_counter(), 0, None
    window = (state or {}).get("window") or {}  # checkpoints before this field: a fresh window
    if window.get("steps"):
        window_steps, sums = window["steps"], window["sums"].to(device)
    # The state at the last step boundary is what a checkpoint holds: the parameters, optimiser
    # and data position change only in the update below, the RNG as the step draws.
    boundary_rng = rng_state()
    # --max-minutes: the clock starts at the first step (the data and model are ready).
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    out_of_time, shown = False, None
    try:
        with StopAtBoundary(active=world == 1) as stop:
            while step < args.steps:
                if stop.requested:
                    raise KeyboardInterrupt
                if deadline is not None and time.monotonic() >= deadline:
                    out_of_time = True
                    break
                try:
                    batch = next(batches)
                except StopIteration:
                    epoch, batch_in_epoch = epoch + 1, 0
                    loader.set_epoch(epoch)
                    batches = iter(loader)
                    continue
                sigma = pixel_sigma(step, args.sigma_steps)
                now = train_step(batch, sigma, learning_rate(step))  # loss, nll, kl
                step, batch_in_epoch, window_steps = step + 1, batch_in_epoch + 1, window_steps + 1
                train_step.updating = False
                boundary_rng = rng_state()
                progress.update(1)
                # Metrics stay on the device between logs, so the GPU is not waited on every step.
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
                    warning = contention.observe(rate)
                    if warning and main:
                        tqdm.write(warning)
                    record = dict(step=step, loss=loss, nll=nll_v, kl=kl_v, nll_above_floor=nll_v - nll_floor(sigma),
                                  bits_per_dim=bits_per_dim(loss), sigma=sigma, lr=learning_rate(step - 1),
                                  steps_per_s=rate, epoch=epoch)
                    if main:
                        writer.write(record)
                        progress.set_postfix(loss=f"{loss:.0f}", bpd=f"{record['bits_per_dim']:.3f}", kl=f"{kl_v:.1f}",
                                             nll_above_floor=f"{record['nll_above_floor']:.0f}", steps_s=f"{rate:.2f}")
                    sums, window_start, window_steps = None, time.perf_counter(), 0
                    if last_ckpt:
                        checkpoint(boundary_rng)
                shown = train_step.last
                if main and (step % args.image_every == 0 or step == args.steps):
                    save_progress_picture(model, *shown, out / "images" / f"step-{step:08d}.png", seed=args.seed)
        if out_of_time:
            # As at the last step: a checkpoint and a picture of where the run stopped.
            tqdm.write(f"--max-minutes {args.max_minutes:g}: stopping at step {step}; --resume continues here")
            if saved_step != step:
                checkpoint(boundary_rng)
            last_picture = out / "images" / f"step-{step:08d}.png"
            if main and shown is not None and not last_picture.exists():
                save_progress_picture(model, *shown, last_picture, seed=args.seed)
    except KeyboardInterrupt:
        # Nothing lost on Ctrl-C, and nothing wrong kept: the state of the last step boundary is
        # checkpointed (it is finite: it was just checked, or is one step past a finite check,
        # which the next log will catch on resume), unless a checkpoint of it is already written.
        if train_step.updating:
            where = f"the last checkpoint is of step {saved_step}" if saved_step is not None else "no checkpoint was written"
            if main:
                tqdm.write(f"interrupted during the update of step {step + 1}; no checkpoint written ({where})")
        elif saved_step == step:
            if main:
                tqdm.write(f"interrupted at step {step}, whose checkpoint is already written")
        else:
            if main:
                tqdm.write(f"interrupted at step {step}; writing a checkpoint so --resume continues here")
            checkpoint(boundary_rng)
        raise
    finally:
        progress.close()
        if writer:
            writer.close()
    return model


def save_progress_picture(model, batch, reconstruction, path: Path, seed: int, scenes: int = 4) -> None:
    """Rows: a scene's context views, its target, the reconstruction, and a prior sample.

    The sample's noise comes from its own generator (the same draws at every step, so pictures
    differ by the model only): the training RNG is untouched, and a resumed run stays exact."""
    context_x, context_v, query_x, query_v = (t[:scenes] for t in batch)
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(c.L, query_v.shape[0], c.z_dim, GRID_SIZE, GRID_SIZE, generator=generator)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        sample = model.generate(context_x, context_v, query_v, noise=noise.to(query_v))
    model.train(was_training)
    rows = []
    for i in range(context_x.shape[0]):
        rows.append(list(context_x[i]) + [None, query_x[i], reconstruction[i].float(), sample[i].float()])
    names = [f"context {k + 1}" for k in range(context_x.shape[1])] + ["", "target", "reconstruction", "prior sample"]
    save_grid(rows, path, captions=[None] * (len(rows) - 1) + [names])


class ContentionWatch:
    """Says once when the steps of a run on several CPU threads get much slower than its best
    (measured on a shared 2-core machine: the small preset at 6.0 steps/s on 2 threads when
    idle, 2.0 with one busy job on the other core, where 1 thread kept 4.1: torch's threads
    wait on each other while the other job holds a core)."""

    def __init__(self, threads: int, slower: float = 2.0):
        self.threads, self.slower = threads, slower
        self.best, self.windows, self.said = 0.0, 0, False

    def observe(self, steps_per_s: float) -> str | None:
        """The warning to show, once, or None. The first window (start-up) is not counted."""
        self.windows += 1
        if self.windows == 1 or self.threads <= 1:
            return None
        self.best = max(self.best, steps_per_s)
        if self.said or steps_per_s * self.slower > self.best:
            return None
        self.said = True
        return (f"steps are {self.best / steps_per_s:.1f}x slower than this run's best ({steps_per_s:.2f} against "
                f"{self.best:.2f} steps/s): another process may be using the cores, which makes torch's "
                f"{self.threads} threads wait on each other; --threads 1 avoids that (stop, then --resume --threads 1)")


class MetricsWriter:
    """metrics.jsonl in the run folder, and TensorBoard when it is installed.

    A run starting at `start_step` (its checkpoint's) first drops the records after that step,
    which a killed run logged past its last checkpoint, so each step is in the log once."""

    def __init__(self, out: Path, start_step: int = 0):
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            truncate_metrics(path, start_step)
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps up to `last_step` (and no torn last line), rewritten atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    text = "".join(kept)
    if text != path.read_text():
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


# --- command line ---------------------------------------------------------------------------


def run_command(ns: argparse.Namespace) -> int:
    """Errors a user can fix (gqn_fast.errors.UserError, OSError) reach gqn_fast.cli as one line."""
    args = TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})
    try:
        train(args)
    except KeyboardInterrupt:
        return 130
    else:
        if not dist.is_initialized() or dist.get_rank() == 0:
            out = Path(args.out)
            last = list_checkpoints(out / "checkpoints")
            print(f"wrote {out}: checkpoints {last[-1].name if last else '(none)'} in {out / 'checkpoints'}, "
                  f"metrics in {out / 'metrics.jsonl'}, pictures in {out / 'images'}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
