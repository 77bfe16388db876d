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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from gqn_fast.checkpoint import (
    CheckpointError,
    check_compatible,
    check_resumable,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gqn_fast.config import GRID_SIZE, GQNConfig
from gqn_fast.data.workers import default_workers
from gqn_fast.devices import device_of
from gqn_fast.errors import Interrupted, UsageError, UserError
from gqn_fast.images import save_grid
from gqn_fast.models import build_model
from gqn_fast.schedules import bits_per_dim, learning_rate, nll_floor, pixel_sigma
from gqn_fast.train_settings import (  # noqa: F401  (TrainArgs: the API)
    TrainArgs,
    auto_workers,
    check_args,
    check_resume_settings,
    describe_settings,
    settings_from_run,
)
from gqn_fast.train_step import TrainStep, make_optimizer


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


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


@dataclasses.dataclass
class Position:
    """How far a run is: the optimizer steps taken, and the data's epoch and batch in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class LogWindow:
    """The (loss, nll, kl) summed over the steps since the last log, kept on the device between
    logs (so the GPU is not waited on every step). Checkpointed: a Ctrl-C or --max-minutes stops
    between two logs, and a resume goes on summing, so its record is the one the unstopped run
    writes."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        self.start, self.steps, self.sums = time.perf_counter(), 0, None
        if saved and saved.get("steps"):  # checkpoints before this field: a fresh window
            self.steps, self.sums = saved["steps"], saved["sums"].to(device)

    def add(self, metrics: torch.Tensor) -> None:
        self.sums = metrics if self.sums is None else self.sums + metrics
        self.steps += 1

    def means(self) -> tuple[float, float, float]:
        loss, nll, kl = (self.sums / self.steps).tolist()
        return loss, nll, kl

    def steps_per_s(self) -> float:
        return self.steps / (time.perf_counter() - self.start)

    def restart(self) -> None:
        self.start, self.steps, self.sums = time.perf_counter(), 0, None

    def saved(self) -> dict:
        return dict(sums=None if self.sums is None else self.sums.cpu(), steps=self.steps)


@dataclasses.dataclass
class Run:
    """One training run: made by `setup` (everything checked, nothing written), then `start`
    opens the run folder and `loop` steps until the end, the deadline or a Ctrl-C."""

    args: TrainArgs
    config: GQNConfig
    device: torch.device
    world: int  # processes
    main: bool  # rank 0: logs, pictures and checkpoints
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    loader: object  # gqn_fast.data.loader's, with set_epoch
    position: Position
    window: LogWindow
    data_source: dict  # {"kind": "download" | "converted" | "builtin", "dataset": its name}
    resumed_from: Path | None
    saved_step: int | None  # the step the newest checkpoint holds
    writer: MetricsWriter | None = None
    progress: tqdm | None = None
    # The state at the last step boundary is what a checkpoint holds: the parameters, optimizer
    # and data position change only in a step's update, the RNG as the step draws.
    boundary_rng: dict | None = None
    shown: tuple | None = None  # the last step's (batch, reconstruction), for pictures
    # The learning-rate schedule (step -> lr) and the clock of --max-minutes: a test gives a run
    # its own (a NaN learning rate, a fast clock) without touching any module.
    learning_rate: Callable[[int], float] = learning_rate
    clock: Callable[[], float] = time.monotonic

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def start(self) -> None:
        """Open the run folder: from here on it is written."""
        from gqn_fast.data.format import write_json_atomic

        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temporaries(self.ckpt_dir):
                tqdm.write(f"removed {stale}, left by a checkpoint write that was killed")
            write_json_atomic(
                self.out / "config.json",
                {"model": self.config.to_dict(), "train": dataclasses.asdict(self.args), "data": self.data_source},
            )
            self.writer = MetricsWriter(self.out, start_step=self.position.step)
            if self.resumed_from is not None:
                tqdm.write(
                    f"resuming {self.out} at step {self.position.step} of {self.args.steps} "
                    f"({self.resumed_from.name}): {describe_settings(self.args)}"
                )
        self.progress = tqdm(
            total=self.args.steps, initial=self.position.step, disable=not self.main, dynamic_ncols=True, desc="train"
        )
        mode = self.train_step.mode
        if self.main and self.device.type == "cuda" and mode != "graphed":
            tqdm.write(
                f"training eagerly on {self.device} ({mode_reason(self.args, self.world)}): each step waits on Python"
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()

    def loop(self) -> None:
        """Steps to args.steps; at --max-minutes, or on Ctrl-C at a step boundary, a checkpoint of
        where it stopped (a second Ctrl-C stops at once)."""
        self.boundary_rng = rng_state()
        try:
            with StopAtBoundary(active=self.world == 1) as stop:
                out_of_time = self._steps(stop)
            if out_of_time:
                self._stop_for_time()
        except KeyboardInterrupt:
            raise Interrupted(self._stop_for_interrupt()) from None

    def _steps(self, stop: StopAtBoundary) -> bool:
        """The steps; True if --max-minutes ran out first."""
        args, position = self.args, self.position
        contention = ContentionWatch(torch.get_num_threads() if self.device.type == "cpu" else 1)
        batches = iter(self.loader)
        # --max-minutes: the clock starts at the first step (the data and model are ready).
        deadline = None if args.max_minutes is None else self.clock() + 60 * args.max_minutes
        while position.step < args.steps:
            if stop.requested:
                raise KeyboardInterrupt
            if deadline is not None and self.clock() >= deadline:
                return True
            try:
                batch = next(batches)
            except StopIteration:
                position.epoch, position.batch = position.epoch + 1, 0
                self.loader.set_epoch(position.epoch)
                batches = iter(self.loader)
                continue
            sigma = pixel_sigma(position.step, args.sigma_steps)
            self.window.add(self.train_step(batch, sigma, self.learning_rate(position.step)))  # loss, nll, kl
            position.step, position.batch = position.step + 1, position.batch + 1
            self.train_step.updating = False
            self.boundary_rng = rng_state()
            self.progress.update(1)
            log_now = position.step % args.log_every == 0 or position.step == args.steps
            checkpoint_now = position.step % args.checkpoint_every == 0 or position.step == args.steps
            if log_now or checkpoint_now:
                self._log(sigma, contention, check_weights=checkpoint_now)
            if checkpoint_now:
                self.checkpoint()
            self.shown = self.train_step.last
            if self.main and (position.step % args.image_every == 0 or position.step == args.steps):
                self._picture()
        return False

    def _log(self, sigma: float, contention: ContentionWatch, check_weights: bool) -> None:
        """One record of the window's means; TrainingDiverged if they, or (before a checkpoint)
        the weights, are not finite."""
        step = self.position.step
        loss, nll, kl = self.window.means()
        # The loss is of the parameters before this step's update; a checkpoint holds those
        # after it, so they are checked too before one is written.
        finite = all(math.isfinite(v) for v in (loss, nll, kl))
        if finite and check_weights:
            finite = bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all())
        if not finite:
            good = list_checkpoints(self.ckpt_dir)
            where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"the loss or the weights became NaN or infinite by step {step} "
                f"(mean loss {loss:.4g}, sigma {sigma:.3f}, lr {self.learning_rate(step - 1):.2e}); "
                f"{where}. Try a lower learning rate or --precision fp32."
            )
        rate = self.window.steps_per_s()
        warning = contention.observe(rate)
        if warning and self.main:
            tqdm.write(warning)
        record = dict(
            step=step,
            loss=loss,
            nll=nll,
            kl=kl,
            nll_above_floor=nll - nll_floor(sigma),
            bits_per_dim=bits_per_dim(loss),
            sigma=sigma,
            lr=self.learning_rate(step - 1),
            steps_per_s=rate,
            epoch=self.position.epoch,
        )
        if self.main:
            self.writer.write(record)
            self.progress.set_postfix(
                loss=f"{loss:.0f}",
                bpd=f"{record['bits_per_dim']:.3f}",
                kl=f"{kl:.1f}",
                nll_above_floor=f"{record['nll_above_floor']:.0f}",
                steps_s=f"{rate:.2f}",
            )
        self.window.restart()

    def checkpoint(self) -> None:
        """A checkpoint of the last step boundary (rank 0 writes it; every rank waits for it)."""
        position = self.position
        if self.main:
            save_checkpoint(
                self.ckpt_dir,
                position.step,
                dict(
                    model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(),
                    rng=self.boundary_rng,
                    data=dict(epoch=position.epoch, batch=position.batch),
                    config=self.config.to_dict(),
                    train=dataclasses.asdict(self.args),
                    window=self.window.saved(),
                ),
                keep=self.args.keep,
            )
        self.saved_step = position.step
        if self.world > 1:
            dist.barrier()

    def _picture_path(self) -> Path:
        return self.out / "images" / f"step-{self.position.step:08d}.png"

    def _picture(self) -> None:
        save_progress_picture(self.model, *self.shown, self._picture_path(), seed=self.args.seed)

    def _stop_for_time(self) -> None:
        """As at the last step: a checkpoint and a picture of where the run stopped."""
        step = self.position.step
        tqdm.write(f"--max-minutes {self.args.max_minutes:g}: stopping at step {step}; --resume continues here")
        if self.saved_step != step:
            self.checkpoint()
        if self.main and self.shown is not None and not self._picture_path().exists():
            self._picture()

    def _stop_for_interrupt(self) -> str:
        """Nothing lost on Ctrl-C, and nothing wrong kept: the state of the last step boundary is
        checkpointed (it is finite: it was just checked, or is one step past a finite check,
        which the next log will catch on resume), unless a checkpoint of it is already written.
        Returns what was kept, in words."""
        step, saved = self.position.step, self.saved_step
        if self.train_step.updating:
            where = f"the last checkpoint is of step {saved}" if saved is not None else "no checkpoint was written"
            return f"during the update of step {step + 1}; no checkpoint written ({where})"
        if saved != step:
            self.checkpoint()
        return f"at step {step}, whose checkpoint is kept in {self.ckpt_dir}; --resume continues here"


def setup(args: TrainArgs, given: frozenset[str] | None = None) -> Run:
    """The run `args` asks for: arguments, data and the checkpoint to resume checked, the model,
    optimizer and loader made and restored; nothing in the run folder written yet. With
    --resume, the settings not in `given` (the TrainArgs fields a command line gave; None: all)
    are the run's. Raises UsageError / CheckpointError / DatasetFormatError on what it cannot use."""
    from gqn_fast.data.builtin import builtin_dataset
    from gqn_fast.data.folder import inspect_folder, open_dataset
    from gqn_fast.data.loader import make_loader

    ckpt_dir = Path(args.out) / "checkpoints"
    existing = list_checkpoints(ckpt_dir)
    state = None
    if args.resume and existing:
        state = load_checkpoint(existing[-1])
        check_resumable(state, existing[-1])
        args = settings_from_run(args, state.get("train", {}), given)
    check_args(args)
    if args.data:  # stored absolute, so a resume or an eval from another folder finds it
        args = dataclasses.replace(args, data=str(Path(args.data).resolve()))
    if existing and not args.resume:
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue, or another --out")
    if args.resume and not existing:
        raise UsageError(
            f"--resume: {ckpt_dir} holds no checkpoint to resume from; leave out --resume to start a new run there"
        )
    config = GQNConfig.preset(args.preset)
    if state is not None:
        check_resume_settings(state.get("train", {}), args, existing[-1])
        check_compatible(state, config, existing[-1])
        if state["step"] >= args.steps:
            raise UsageError(
                f"--steps: the run is at step {state['step']} already ({existing[-1]}); "
                f"pass a larger --steps to train further"
            )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    if args.max_minutes is not None and world > 1:
        raise UsageError("--max-minutes: a single-process run only (several processes would stop at different steps)")

    data_root = Path(args.data) if args.data else builtin_dataset("rooms", scenes=args.builtin_scenes)
    found = inspect_folder(data_root, args.dataset)
    # A download is indexed once, by rank 0; the other ranks then read its index (on one host).
    if world > 1 and rank != 0:
        dist.barrier()
    dataset = open_dataset(data_root, "train", args.dataset, args.skip_corrupt, progress=rank == 0)
    if world > 1 and rank == 0:
        dist.barrier()
    data_source = {"kind": found.kind if args.data else "builtin", "dataset": dataset.manifest["name"]}
    if args.max_context > dataset.num_views - 1:
        raise UsageError(
            f"--max-context: at most T - 1 = {dataset.num_views - 1} for {data_root} (one of its "
            f"{dataset.num_views} views is the query), got {args.max_context}"
        )
    if args.batch > dataset.num_scenes // world:  # DistributedSampler's share with drop_last
        per = f" per process ({world} processes)" if world > 1 else ""
        raise UsageError(
            f"--batch: {args.batch} is more than the {dataset.num_scenes // world} training scenes{per} of {data_root}"
        )

    torch.manual_seed(args.seed)
    model = build_model(config, args.impl).to(device)
    mode = step_mode(args, device, world)
    optimizer = make_optimizer(model, device, learning_rate(0), graphed=mode == "graphed")
    position = Position()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        position = Position(step=state["step"], epoch=state["data"]["epoch"], batch=state["data"]["batch"])

    elbo = model  # calling a GQN computes its ELBO
    if world > 1:
        elbo = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        from gqn_fast.model import compile_options

        elbo = torch.compile(elbo, options=compile_options(model))

    workers = args.workers
    if workers is None:
        ranks_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's
        workers = auto_workers(dataset.worker_processes, device.type == "cuda", default_workers(), ranks_on_host)
    loader = make_loader(
        dataset,
        "train",
        batch_size=args.batch,
        max_context=args.max_context,
        seed=args.seed,
        num_workers=workers,
        distributed=world > 1,
    )
    # An allowed change of --batch or --data can leave the old position past the epoch's end.
    loader.set_epoch(position.epoch, start_batch=min(position.batch, len(loader)))

    return Run(
        args=args,
        config=config,
        device=device,
        world=world,
        main=rank == 0,
        model=model,
        optimizer=optimizer,
        train_step=TrainStep(model, optimizer, device, args.precision, mode, elbo=elbo),
        loader=loader,
        position=position,
        window=LogWindow(device, (state or {}).get("window")),
        data_source=data_source,
        resumed_from=existing[-1] if state is not None else None,
        saved_step=position.step if state is not None else None,
    )


def train(args: TrainArgs, given: frozenset[str] | None = None, **parts) -> torch.nn.Module:
    """Train per `args` (with --resume, the settings not in `given` are the run's: see setup); returns the (unwrapped) model. Raises TrainingDiverged on NaN/inf,
    UsageError / CheckpointError / DatasetFormatError on arguments, runs or data it cannot use
    (all checked before anything in the run folder is written). parts: fields of the Run to give
    it (its learning_rate schedule, its clock)."""
    run = dataclasses.replace(setup(args, given), **parts)
    try:
        run.start()
        run.loop()
    finally:
        run.close()
    return run.model


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
    """Says once when the steps of a run on several CPU threads get much slower than its best:
    torch's threads wait on each other while another job holds a core, where one thread would
    keep most of its speed."""

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
        return (
            f"steps are {self.best / steps_per_s:.1f}x slower than this run's best ({steps_per_s:.2f} against "
            f"{self.best:.2f} steps/s): another process may be using the cores, which makes torch's "
            f"{self.threads} threads wait on each other; --threads 1 avoids that (stop, then --resume --threads 1)"
        )


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
        train(args, given=ns.given_options)
        if not dist.is_initialized() or dist.get_rank() == 0:
            out = Path(args.out)
            last = list_checkpoints(out / "checkpoints")
            print(
                f"wrote {out}: checkpoints {last[-1].name if last else '(none)'} in {out / 'checkpoints'}, "
                f"metrics in {out / 'metrics.jsonl'}, pictures in {out / 'images'}"
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
