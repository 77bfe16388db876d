"""The training command: exact resume, NaN handling, refusing other configs, DDP, and the
eval and sample commands on what it wrote."""

import json
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import HostReads, ctrl_c_at_call

from gqn_fast import cli
from gqn_fast.checkpoint import CheckpointError, atomic_save, list_checkpoints, load_checkpoint
from gqn_fast.errors import UsageError
from gqn_fast.train import TrainArgs, TrainingDiverged, train
from gqn_fast.train_settings import auto_workers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from gqn_fast.data.builtin import make_dataset

    root = tmp_path_factory.mktemp("data") / "rooms"
    return make_dataset(root, "rooms", scenes=24, seed=3, workers=1, progress=False)


def args_for(dataset, out, **overrides):
    values = dict(
        data=str(dataset),
        preset="small",
        steps=4,
        batch=3,
        max_context=3,
        out=str(out),
        log_every=1,
        image_every=1000,
        checkpoint_every=2,
        keep=2,
        device="cpu",
    )
    values.update(overrides)
    return TrainArgs(**values)


# 22 train scenes at batch 3 make 7 batches an epoch: 6 steps stay in the first epoch, 10 cross
# into the second.
@pytest.mark.parametrize("steps, final_epoch", [(6, 0), (10, 1)])
def test_resume_continues_exactly(dataset, tmp_path, steps, final_epoch):
    """N steps straight == N/2 steps, stop, resume to N: identical parameters on the CPU."""
    half = steps // 2
    straight = train(args_for(dataset, tmp_path / "straight", steps=steps, checkpoint_every=half))
    train(args_for(dataset, tmp_path / "split", steps=half, checkpoint_every=half))
    resumed = train(args_for(dataset, tmp_path / "split", steps=steps, checkpoint_every=half, resume=True))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    state = load_checkpoint(list_checkpoints(tmp_path / "split" / "checkpoints")[-1])
    assert state["step"] == steps
    assert state["data"]["epoch"] == final_epoch


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """The last checkpoint of a 4-step run, uninterrupted and without pictures."""
    out = tmp_path_factory.mktemp("straight")
    train(args_for(dataset, out, steps=4, checkpoint_every=4))
    return load_checkpoint(list_checkpoints(out / "checkpoints")[-1])


def assert_same_state(state, expected):
    """Parameters, optimiser state, RNG and data position identical, bit for bit."""
    assert state["step"] == expected["step"] and state["data"] == expected["data"]
    for name, value in expected["model"].items():
        assert torch.equal(state["model"][name], value), name
    for index, slots in expected["optimizer"]["state"].items():
        for key, value in slots.items():
            assert torch.equal(state["optimizer"]["state"][index][key], value), (index, key)
    assert torch.equal(state["rng"]["torch"], expected["rng"]["torch"])


def last_state(out):
    return load_checkpoint(list_checkpoints(out / "checkpoints")[-1])


def test_resume_after_a_progress_picture_is_exact(dataset, tmp_path, straight):
    """Pictures at every step, split by a resume, change nothing against a run without any."""
    out = tmp_path / "run"
    train(args_for(dataset, out, steps=2, image_every=1))
    train(args_for(dataset, out, steps=4, image_every=1, resume=True))
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"step-0000000{i}.png" for i in (1, 2, 3, 4)]
    assert_same_state(last_state(out), straight)


@pytest.mark.parametrize("checkpoint_every", [1, 4])
def test_ctrl_c_mid_step_keeps_the_last_boundary(dataset, tmp_path, straight, monkeypatch, checkpoint_every):
    """A KeyboardInterrupt in step 3's backward, after the step drew its latents: the checkpoint
    holds the state of step 2 (written then, or at the interrupt), and resuming is exact."""
    backward, calls = torch.Tensor.backward, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(args_for(dataset, out, steps=4, checkpoint_every=checkpoint_every))
    monkeypatch.undo()
    assert last_state(out)["step"] == 2
    train(args_for(dataset, out, steps=4, checkpoint_every=checkpoint_every, resume=True))
    assert_same_state(last_state(out), straight)


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN], ids=["foreground", "background"])
def test_ctrl_c_signal_stops_at_the_next_boundary(dataset, tmp_path, straight, monkeypatch, inherited):
    """A real SIGINT during step 2: the step finishes, its state is checkpointed, the run stops;
    the SIGINT disposition the process had is restored, whichever it was (a shell starts a
    background job with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, inherited)
    try:
        _ctrl_c_run(dataset, tmp_path, straight, monkeypatch, inherited)
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_run(dataset, tmp_path, straight, monkeypatch, inherited):
    calls = ctrl_c_at_call(monkeypatch, torch.Tensor, "backward", 2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(args_for(dataset, out, steps=4, checkpoint_every=4))
    monkeypatch.undo()
    assert len(calls) == 2 and last_state(out)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is inherited  # the disposition restored
    train(args_for(dataset, out, steps=4, checkpoint_every=4, resume=True))
    assert_same_state(last_state(out), straight)


def test_resume_with_only_out_continues_the_run_as_it_was(dataset, tmp_path, straight, monkeypatch, capsys):
    """`gqn-fast train --out X --resume` alone takes every setting from the run (its data, batch,
    max-context, steps, ...): a run stopped by Ctrl-C after step 2 so resumed ends bit for bit
    where the unstopped run ends, and says in one line what it resumes."""
    out = tmp_path / "run"
    argv = ["train", "--data", str(dataset), "--steps", "4", "--batch", "3", "--max-context", "3", "--out", str(out)]
    argv += ["--log-every", "1", "--image-every", "1000", "--checkpoint-every", "4", "--keep", "2", "--device", "cpu"]
    ctrl_c_at_call(monkeypatch, torch.Tensor, "backward", 2)
    assert cli.main(argv) == 130
    monkeypatch.undo()
    assert last_state(out)["step"] == 2
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert (
        f"resuming {out} at step 2 of 4 (step-00000002.pt): small preset, sigma-steps 200000, batch 3, "
        f"max-context 3, impl fast, precision fp32, seed 0; data: {dataset.resolve()}\n" in said
    ), said
    assert_same_state(last_state(out), straight)


def test_resume_after_a_kill_cleans_up_and_logs_each_step_once(dataset, tmp_path, straight):
    """A kill after step 4 was logged, while its checkpoint was being written: the resume from
    step 2 removes the half-written file and the log's records of steps 3 and 4, then is exact."""
    out = tmp_path / "run"
    train(args_for(dataset, out, steps=4, checkpoint_every=2, keep=3))
    latest = list_checkpoints(out / "checkpoints")[-1]
    os.replace(latest, latest.with_name(f".{latest.name}.tmp-4242"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by the kill
    train(args_for(dataset, out, steps=4, checkpoint_every=2, keep=3, resume=True))
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert_same_state(last_state(out), straight)


def test_run_folder_holds_metrics_checkpoints_and_pictures(dataset, tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(dataset),
                "--steps",
                "4",
                "--batch",
                "2",
                "--max-context",
                "2",
                "--out",
                str(out),
                "--log-every",
                "2",
                "--checkpoint-every",
                "2",
                "--keep",
                "1",
                "--image-every",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "nll", "kl", "nll_above_floor", "bits_per_dim", "sigma", "lr", "steps_per_s"):
        assert all(key in r for r in records)
    assert len(list_checkpoints(out / "checkpoints")) == 1  # --keep 1
    assert (out / "images" / "step-00000004.png").stat().st_size > 0

    ckpt = str(list_checkpoints(out / "checkpoints")[-1])
    assert cli.main(["eval", ckpt, "--scenes", "2", "--max-context", "2", "--device", "cpu"]) == 0
    metrics = json.loads((out / "eval" / "step-00000004" / "metrics.json").read_text())
    assert [c["context_views"] for c in metrics["curve"]] == [1, 2]
    assert metrics["scenes"] == 2 and metrics["reconstruction"]["neg_elbo_nats"] > 0
    assert (out / "eval" / "step-00000004" / "context_curve.png").stat().st_size > 0

    assert (
        cli.main(
            ["sample", ckpt, "--scenes", "1", "--samples", "2", "--frames", "4", "--context", "2", "--device", "cpu"]
        )
        == 0
    )
    assert (out / "samples" / "step-00000004" / "scene-0000.png").exists()
    from PIL import Image

    gif = Image.open(out / "samples" / "step-00000004" / "scene-0000-fly-around.gif")
    assert gif.n_frames == 4


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    train(args_for(dataset, out, steps=2, checkpoint_every=2))
    good = list_checkpoints(out / "checkpoints")[-1]
    before = good.read_bytes()
    # From step 2 on, a NaN learning rate poisons every weight.
    from gqn_fast.schedules import learning_rate

    poisoned = lambda step: float("nan") if step >= 2 else learning_rate(step)  # noqa: E731
    with pytest.raises(
        TrainingDiverged, match=r"NaN or infinite by step \d+.*last good checkpoint is .*step-00000002\.pt"
    ):
        train(args_for(dataset, out, steps=8, checkpoint_every=2, resume=True), learning_rate=poisoned)
    assert list_checkpoints(out / "checkpoints")[-1] == good
    assert good.read_bytes() == before


def test_checkpoint_of_another_config_is_refused(dataset, tmp_path):
    out = tmp_path / "run"
    train(args_for(dataset, out, steps=2))
    with pytest.raises(UsageError, match=r"--preset small .* this command has --preset paper"):
        train(args_for(dataset, out, steps=4, preset="paper", resume=True))
    # Allowed to change, the preset still cannot load the checkpoint's weights.
    with pytest.raises(CheckpointError, match=r"made for L=6, but this run has L=12"):
        train(args_for(dataset, out, steps=4, preset="paper", resume=True, allow_change="preset"))
    with pytest.raises(CheckpointError, match=r"already holds checkpoints; pass --resume"):
        train(args_for(dataset, out, steps=4))


def test_interrupted_checkpoint_write_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "step-00000001.pt"
    atomic_save({"version": 2, "step": 1, "model": {}, "config": {}}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": 2, "step": 2, "model": {}, "config": {}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "step-00000001.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"step-00000001.pt: not a gqn-fast checkpoint \(not a PyTorch zip file\)"
    ):
        load_checkpoint(path)


def _ddp_worker(rank, world, port, dataset, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    model = train(args_for(dataset, out, steps=3, batch=2, checkpoint_every=3))
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_ddp_keeps_ranks_identical(dataset, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(dataset), tmp_path), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Rank 0 alone writes the run folder.
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 1
    assert (tmp_path / "metrics.jsonl").exists()


def test_max_minutes_stops_with_a_checkpoint_and_a_picture(dataset, tmp_path, straight):
    """--max-minutes: at the first step boundary past the time limit the run ends normally with a
    checkpoint and a picture of that step, and --resume finishes it exactly."""
    readings = iter(range(0, 10_000, 60))  # one minute passes per reading of the run's clock
    out = tmp_path / "run"
    train(args_for(dataset, out, max_minutes=2.5), clock=lambda: float(next(readings)))
    stopped = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert 0 < stopped["step"] < 4
    assert (out / "images" / f"step-{stopped['step']:08d}.png").exists()
    train(args_for(dataset, out, resume=True))
    assert_same_state(last_state(out), straight)


@pytest.mark.parametrize("minutes", [0, -1.0, float("nan")])
def test_max_minutes_must_be_positive(dataset, tmp_path, minutes):
    with pytest.raises(UsageError, match="--max-minutes: expected a positive number"):
        train(args_for(dataset, tmp_path / "run", max_minutes=minutes))


def test_training_steps_read_nothing_back_between_logs(dataset, tmp_path):
    """A step between two logs reads no value back to the host (on a GPU each read would wait
    for the queued work): the ELBO's input checks are skipped for the loader's batches, valid by
    construction (gqn_fast.inputs.values_trusted), and the metrics stay on the device. Two runs
    that differ only in their number of steps read back as often (their last step logs,
    checks the weights and draws a picture)."""
    reads = {}
    for steps in (2, 5):
        with HostReads() as counter:
            train(args_for(dataset, tmp_path / f"run-{steps}", steps=steps, log_every=100, checkpoint_every=100))
        reads[steps] = counter.reads
    assert reads[2] == reads[5] > 0, reads


def test_a_log_window_split_by_a_stop_is_logged_as_the_unstopped_run_logs_it(dataset, tmp_path, monkeypatch):
    """log_every 4, Ctrl-C after step 3 (a checkpoint between two logs), resume to 8: the
    records of steps 4 and 8 equal the unstopped run's (the window's sums travel in the checkpoint)."""
    settings = dict(steps=8, log_every=4, checkpoint_every=8)
    train(args_for(dataset, tmp_path / "straight", **settings))
    ctrl_c_at_call(monkeypatch, torch.Tensor, "backward", 3)  # asks for a stop after step 3
    with pytest.raises(KeyboardInterrupt):
        train(args_for(dataset, tmp_path / "split", **settings))
    monkeypatch.undo()
    assert last_state(tmp_path / "split")["step"] == 3 and last_state(tmp_path / "split")["window"]["steps"] == 3
    train(args_for(dataset, tmp_path / "split", resume=True, **settings))

    def records(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"} for line in lines]

    assert [r["step"] for r in records(tmp_path / "split")] == [4, 8]
    assert records(tmp_path / "split") == records(tmp_path / "straight")


def test_contention_is_said_once_when_steps_slow_down():
    from gqn_fast.train import ContentionWatch

    watch = ContentionWatch(threads=2)
    assert [watch.observe(r) for r in (0.5, 6.0, 5.5, 3.1)] == [None] * 4  # start-up, then within 2x
    warning = watch.observe(2.0)
    assert "3.0x slower" in warning and "--threads 1" in warning
    assert watch.observe(1.0) is None  # said once
    single = ContentionWatch(threads=1)
    assert all(single.observe(r) is None for r in (6.0, 6.0, 0.1))  # one thread: nothing to change


def test_threads_sets_torch_threads(dataset, tmp_path):
    before = torch.get_num_threads()
    try:
        train(args_for(dataset, tmp_path / "run", steps=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="--threads: expected a positive int"):
        train(args_for(dataset, tmp_path / "run2", steps=1, threads=0))


def test_the_train_command_says_where_its_results_went(dataset, tmp_path, capsys):
    from gqn_fast import cli

    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(dataset),
                "--out",
                str(out),
                "--steps",
                "1",
                "--batch",
                "2",
                "--device",
                "cpu",
                "--image-every",
                "1",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in lines if line.startswith("wrote ")]) == 1, lines  # once, last
    said = lines[-1]
    assert said == (
        f"wrote {out}: checkpoints step-00000001.pt in {out / 'checkpoints'}, "
        f"metrics in {out / 'metrics.jsonl'}, pictures in {out / 'images'}"
    )


def test_workers_default_to_what_the_data_and_the_device_need():
    # (decodes JPEGs, on a GPU, cores, ranks on the host) -> workers
    cases = {
        (False, False, 16, 1): 0,  # a converted folder on the CPU: read in the loop
        (True, False, 16, 1): 1,  # a download on the CPU: one decoding process beside the slow step
        (False, True, 16, 1): 2,  # a converted folder on a GPU: two reading threads
        (True, True, 16, 1): 8,  # a download on a GPU: a core each, at most 8
        (True, True, 6, 1): 5,  # ... one core left to the training loop
        (True, True, 16, 4): 3,  # ... the host's cores shared by its ranks
        (True, True, 2, 4): 1,  # ... never none
    }
    for (decodes, on_gpu, cores, ranks), workers in cases.items():
        assert auto_workers(decodes, on_gpu, cores, ranks) == workers, (decodes, on_gpu, cores, ranks)
