"""The training step of `gqn-fast train` (gqn_fast/train_step.py): graph-ready and exact.

On the CPU, the "static" mode (the graphed mode's per-M buffers and dispatch, a tensor sigma and
learning rate updated in place, the step run eagerly on the buffers) gives the parameters of
the plain eager loop bit for bit, over steps whose M, sigma and learning rate all change, and a
resume across an M never seen before the stop is exact. On CUDA (marked, run by
bench/gpu_check.py), the graphed step against the eager one.
"""

import copy

import pytest
import torch
from helpers import RMS_LIMITS, HostReads, assert_close_rms, tiny_config

from gqn_fast.data.builtin import make_dataset
from gqn_fast.data.loader import make_loader, to_model_inputs
from gqn_fast.model import GQN
from gqn_fast.schedules import learning_rate, pixel_sigma
from gqn_fast.train_step import TrainStep, make_optimizer


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """8 loader batches (B = 3, M drawn from 1..4), as `gqn-fast train` gets them."""
    root = make_dataset(
        tmp_path_factory.mktemp("data") / "rooms", "rooms", scenes=30, seed=5, workers=1, progress=False
    )
    loader = make_loader(root, "train", batch_size=3, max_context=4, seed=1, pin_memory=torch.cuda.is_available())
    out = []
    while len(out) < 8:
        out += list(loader)
        loader.set_epoch(len(out))
    out = out[:8]
    assert len({b.context_x.shape[1] for b in out}) >= 3, [b.context_x.shape[1] for b in out]
    return out


def schedule(step):
    # Steps far apart on the paper's schedules, so sigma and the rate differ at every step.
    return pixel_sigma(step * 20_000, 200_000), learning_rate(step * 150_000)


def plain_loop(model, batches, device, first_step=0):
    """The loop as it was written before TrainStep: fresh tensors, Python floats, a float lr."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
    metrics = []
    for k, batch in enumerate(batches):
        sigma, lr = schedule(first_step + k)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = model.elbo(*to_model_inputs(batch, device), sigma=sigma)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        metrics.append(
            torch.stack([result.loss.detach(), result.nll.detach().mean(), result.kl.detach().sum(1).mean()])
        )
    return metrics


def run_steps(step, batches, first_step=0):
    return [step(batch, *schedule(first_step + k)).clone() for k, batch in enumerate(batches)]


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return GQN(tiny_config(L=2, share_cores=False))


def test_the_static_step_is_the_plain_loop_bit_for_bit(batches):
    plain_model, static_model = fresh_model(), fresh_model()
    torch.manual_seed(7)
    expected = plain_loop(plain_model, batches, "cpu")
    torch.manual_seed(7)
    step = TrainStep(
        static_model, make_optimizer(static_model, torch.device("cpu"), 1e-3, graphed=False), "cpu", mode="static"
    )
    got = run_steps(step, batches)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for (name, a), b in zip(plain_model.state_dict().items(), static_model.state_dict().values()):
        assert torch.equal(a, b), name
    # One set of buffers per context size, reused: the addresses a graph would read stay put.
    assert sorted(step.static) == sorted({b.context_x.shape[1] for b in batches})
    views = batches[-1].context_x.shape[1]
    address = step.static[views].inputs[0].data_ptr()
    step(batches[-1], *schedule(9))
    assert step.static[views].inputs[0].data_ptr() == address and step.last[0][0].data_ptr() == address


def test_a_resume_across_a_context_size_never_seen_before_is_exact(batches):
    """Stop after 4 steps, rebuild model, optimizer and step from a checkpoint's state, go on:
    the steps after the stop bring context sizes the first steps never had."""
    seen = {b.context_x.shape[1] for b in batches[:4]}
    assert {b.context_x.shape[1] for b in batches[4:]} - seen, "the fixture's later batches bring a new M"
    straight = fresh_model()
    torch.manual_seed(3)
    step = TrainStep(straight, make_optimizer(straight, torch.device("cpu"), 1e-3, graphed=False), "cpu", mode="static")
    run_steps(step, batches)

    stopped = fresh_model()
    torch.manual_seed(3)
    step = TrainStep(stopped, make_optimizer(stopped, torch.device("cpu"), 1e-3, graphed=False), "cpu", mode="static")
    run_steps(step, batches[:4])
    saved = copy.deepcopy(
        {"model": stopped.state_dict(), "optimizer": step.optimizer.state_dict(), "rng": torch.get_rng_state()}
    )
    resumed = fresh_model(seed=99)  # other weights, replaced by the checkpoint's
    optimizer = make_optimizer(resumed, torch.device("cpu"), 1e-3, graphed=False)
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    run_steps(TrainStep(resumed, optimizer, "cpu", mode="static"), batches[4:], first_step=4)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_modes_and_optimizers_are_checked():
    model = fresh_model()
    with pytest.raises(ValueError, match="mode"):
        TrainStep(model, make_optimizer(model, torch.device("cpu"), 1e-3, graphed=False), "cpu", mode="fast")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TrainStep(model, make_optimizer(model, torch.device("cpu"), 1e-3, graphed=False), "cpu", mode="graphed")
    with pytest.raises(TypeError, match="tensor learning rate"):
        TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), "cpu")


# --- on a GPU ---------------------------------------------------------------------------------


def cuda_steps(mode, batches, steps, seed=0):
    device = torch.device("cuda")
    model = fresh_model().to(device)
    torch.manual_seed(seed)
    step = TrainStep(model, make_optimizer(model, device, 1e-3, graphed=mode == "graphed"), device, mode=mode)
    metrics = [step(batches[k % len(batches)], *schedule(k)).clone() for k in range(steps)]
    return model, step, metrics


@pytest.mark.cuda
def test_cuda_graphed_training_follows_eager_training(batches):
    """20 steps with changing M, sigma and learning rate, TF32 off: the parameters within the fp32 limit."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager, _, eager_metrics = cuda_steps("eager", batches, 20)
        graphed, step, graphed_metrics = cuda_steps("graphed", batches, 20)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert_close_rms(b, a, 1e-4, name)  # 20 Adam steps amplify fp32 rounding a little
    assert_close_rms(
        torch.stack(graphed_metrics), torch.stack(eager_metrics), RMS_LIMITS[torch.float32] * 10, "metrics"
    )
    assert sorted(step.static) == sorted({b.context_x.shape[1] for b in batches})
    assert all(s.graph is not None for s in step.static.values())


@pytest.mark.cuda
def test_cuda_each_context_size_is_captured_once_and_graphs_share_their_memory(batches):
    same_m = [b for b in batches if b.context_x.shape[1] == batches[0].context_x.shape[1]][:1] * 6
    torch.cuda.reset_peak_memory_stats()
    cuda_steps("graphed", same_m, 6)
    one = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _, step, _ = cuda_steps("graphed", batches, 16)
    every = torch.cuda.max_memory_allocated()
    assert len(step.static) == len({b.context_x.shape[1] for b in batches})
    assert [s.captures for s in step.static.values()] == [1] * len(step.static)
    assert every <= 1.2 * one, (every, one)


@pytest.mark.cuda
def test_cuda_a_graphed_step_reads_nothing_back(batches):
    _, step, _ = cuda_steps("graphed", batches, len(batches))  # every M captured
    with HostReads() as reads:
        for k, batch in enumerate(batches):
            step(batch, *schedule(k))
    assert reads.reads == 0


@pytest.mark.cuda
def test_cuda_a_graphed_resume_is_exact(batches):
    device = torch.device("cuda")
    straight, _, _ = cuda_steps("graphed", batches, 8, seed=4)
    model = fresh_model().to(device)
    torch.manual_seed(4)
    step = TrainStep(model, make_optimizer(model, device, 1e-3, graphed=True), device, mode="graphed")
    for k in range(4):
        step(batches[k], *schedule(k))
    saved = copy.deepcopy(
        {"model": model.state_dict(), "optimizer": step.optimizer.state_dict(), "rng": torch.cuda.get_rng_state(device)}
    )
    resumed = fresh_model(seed=99).to(device)
    optimizer = make_optimizer(resumed, device, 1e-3, graphed=True)
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.cuda.set_rng_state(saved["rng"], device)
    step = TrainStep(resumed, optimizer, device, mode="graphed")
    for k in range(4, 8):
        step(batches[k], *schedule(k))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
