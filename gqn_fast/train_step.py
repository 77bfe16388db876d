"""One training step as `gqn-fast train` runs it, and as bench/ times it: the batch to the
device, the ELBO forward and backward, the Adam update, and the step's metrics, kept on the device.

At GQN's sizes an eager step on a GPU waits on Python: every op is a host call, and the GPU's
kernels take less time than the calls that launch them. So on CUDA the whole step is replayed
from CUDA graphs (mode "graphed"): the pixel sigma and the learning rate are device tensors
updated in place, so annealing never re-captures; the batch is copied into static buffers
(non-blocking, from the loader's pinned memory) and converted to floats inside the graph; the
number of context views M is drawn per batch, so each M gets its own graph, captured when it
first comes (its first step runs eagerly, which also warms up cuDNN and cuBLAS), all sharing
one memory pool. The capture itself draws no random numbers for the run: the CUDA generator is
put back after it, so a graphed run draws what an eager one draws.

Modes: "eager" (new tensors every step: the CPU, DDP, torch.compile, --no-cuda-graphs),
"static" (the graphed mode's buffers and per-M dispatch, the step run eagerly on them: what a
graph replays, testable on the CPU), "graphed" (static, replayed from CUDA graphs).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from gqn_fast.data.loader import Batch, to_model_inputs
from gqn_fast.inputs import values_trusted

MODES = ("eager", "static", "graphed")
METRICS = ("loss", "nll", "kl")  # the step's metrics tensor, in this order: batch means, fp32


def make_optimizer(model: torch.nn.Module, device: torch.device, lr: float, graphed: bool) -> torch.optim.Adam:
    """The paper's Adam(0.9, 0.999, 1e-8), fused (one kernel for every parameter's update, on the
    CPU too: a third of the foreach update's time there),
    with its learning rate a tensor that TrainStep updates in place. On the CPU it is float64,
    which gives the same parameters as a Python float (tested); in a CUDA graph it is a device
    tensor and the update `capturable`."""
    lr_tensor = torch.tensor(
        lr, dtype=torch.float64 if not graphed else torch.float32, device=device if graphed else "cpu"
    )
    return torch.optim.Adam(
        model.parameters(), lr=lr_tensor, betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=graphed
    )


class TrainStep:
    """`step(batch, sigma, lr)` -> metrics [3] (loss, nll, kl: batch means) on the device.

    batch: a loader Batch (uint8 images, float32 viewpoints, on the host); sigma, lr: floats,
    copied into device tensors without a host wait. `elbo`: what computes the ELBO (the model,
    or its DDP or compiled wrapper). After a step, `last` holds its inputs and reconstruction
    (for pictures; overwritten by the next step in the static modes), and `updating` is True
    from the moment the update may have begun until the step returned: a Ctrl-C that lands
    there must not checkpoint the half-updated state.
    """

    def __init__(self, model, optimizer, device, precision: str = "fp32", mode: str = "eager", elbo=None):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        device = torch.device(device)
        if mode == "graphed" and device.type != "cuda":
            raise ValueError(f"mode 'graphed': CUDA graphs need a CUDA device, got {device}")
        self.model, self.optimizer, self.device, self.mode = model, optimizer, device, mode
        self.elbo = elbo if elbo is not None else model
        self.precision = precision
        self.sigma = torch.ones((), dtype=torch.float64, device=device)
        # One learning-rate tensor for every group, updated in place (a graph reads its memory).
        lr = optimizer.param_groups[0]["lr"]
        if not isinstance(lr, torch.Tensor):
            raise TypeError("optimizer: expected a tensor learning rate (gqn_fast.train_step.make_optimizer)")
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        self.static: dict[int, _StaticStep] = {}  # M -> its buffers (and graph)
        self.pool = torch.cuda.graph_pool_handle() if mode == "graphed" else None
        self.last, self.updating = None, False

    def __call__(self, batch: Batch, sigma: float, lr: float) -> torch.Tensor:
        self.updating = False
        self.sigma.fill_(sigma)
        self.lr.fill_(lr)
        if self.mode == "eager":
            inputs = to_model_inputs(batch, self.device)
            metrics, mean = self._forward_backward_update(*inputs)
            self.last = inputs, mean
            return metrics
        views = batch.context_x.shape[1]
        static = self.static.get(views)
        if static is None:
            static = self.static[views] = _StaticStep(batch, self.device)
            static.load(batch)
            if self.mode != "graphed":
                return static.run_eagerly(self)
            # The real step, and the graph's warm-up, on a side stream as capture wants it.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                metrics = static.run_eagerly(self)
            torch.cuda.current_stream(self.device).wait_stream(side)
            static.capture(self)
            return metrics
        static.load(batch)
        return static.replay(self) if self.mode == "graphed" else static.run_eagerly(self)

    def _forward_backward_update(self, context_x, context_v, query_x, query_v):
        # No cast cache in a graph: a cached cast made at capture would be replayed stale.
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=self.mode != "graphed")
            if self.precision == "bf16"
            else nullcontext()
        )
        with autocast, values_trusted():  # the loader's batches are valid by construction
            result = self.elbo(context_x, context_v, query_x, query_v, sigma=self.sigma)
        # Kept allocated in the static modes: a graph's gradients live at fixed addresses.
        self.optimizer.zero_grad(set_to_none=self.mode == "eager")
        result.loss.backward()
        self.updating = True
        self.optimizer.step()
        metrics = torch.stack(
            [result.loss.detach().float(), result.nll.detach().mean().float(), result.kl.detach().sum(1).mean().float()]
        )
        return metrics, result.mean.detach()


class _StaticStep:
    """The buffers of one context size M: the batch as uint8 and float32 on the device, at fixed
    addresses, the step's outputs, and (graphed) the CUDA graph that reads and writes them."""

    def __init__(self, batch: Batch, device: torch.device):
        # The loader's layout (channels-last strides), so the copy from pinned memory is one block.
        self.host = Batch(*(torch.empty_like(t, device=device) for t in batch))
        self.inputs = tuple(torch.empty(t.shape, dtype=torch.float32, device=device) for t in batch)  # contiguous
        self.graph = self.metrics = self.mean = None
        self.captures = 0  # graphs recorded: one for the run's life (a test holds it to that)

    def load(self, batch: Batch) -> None:
        for buffer, value in zip(self.host, batch):
            buffer.copy_(value, non_blocking=True)

    def _convert(self) -> None:
        """The batch to the model's inputs (to_model_inputs) in the static buffers, inside the graph."""
        to_model_inputs(self.host, self.host.context_x.device, out=self.inputs)

    def run_eagerly(self, step: TrainStep) -> torch.Tensor:
        self._convert()
        metrics, mean = step._forward_backward_update(*self.inputs)
        step.last = self.inputs, mean
        return metrics

    def capture(self, step: TrainStep) -> None:
        """Record the step into a graph (recording runs nothing); the CUDA RNG is put back after."""
        device = step.device
        rng = torch.cuda.get_rng_state(device)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        self.captures += 1
        with torch.cuda.graph(self.graph, pool=step.pool):
            self._convert()
            self.metrics, self.mean = step._forward_backward_update(*self.inputs)
        torch.cuda.set_rng_state(rng, device)

    def replay(self, step: TrainStep) -> torch.Tensor:
        step.updating = True  # the replay updates the parameters as one call
        self.graph.replay()
        step.last = self.inputs, self.mean
        return self.metrics
