"""What one eager training step asks of the host: the ops it dispatches and the autograd nodes
its backward runs, counted exactly on the meta device (shapes only, no arithmetic), for the
model's GPU branches.

Where a step's GPU work is small (the small preset, shared cores, bf16) an eager step is bound by
the host: each op costs the Python and dispatcher time of a call (a few microseconds) and, if it
computes, a kernel launch; each autograd node costs the engine a call in backward. These counts
do not depend on the machine, so they can be compared anywhere, and a test holds the fast model
to at most the reference's.

Counted: ops that compute (each a kernel launch on a GPU), views (host time only), the project's
custom ops (one op each; on a GPU one to three launches), and autograd nodes. The fast model's
Triton branches are what runs on a GPU; on meta tensors `gqn_fast.model` is told they apply
(`gpu_branches`), and each custom op is counted once, not the PyTorch math it runs on meta.
"""

from __future__ import annotations

import collections
import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gqn_fast.model
from gqn_fast.reference import transform_viewpoint

# aten ops that only make a new view of existing memory: no kernel on any device.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "unsqueeze",
    "squeeze", "expand", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "narrow",
    "detach", "alias", "as_strided", "view_as", "diagonal", "unfold", "lift_fresh",
})  # fmt: skip
CUSTOM_OPS = ("conv_lstm_cell", "lstm_gates", "posterior_sample_kl", "pixel_nll")


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.muted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted:
            name = func.overloadpacket.__name__
            self.ops["views" if name in VIEW_OPS else "ops"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpu_branches(counter: _Counter):
    """gqn_fast.model takes its Triton branches (as on a GPU), each custom op counted as one."""

    def counted(op):
        def call(*args, **kwargs):
            counter.ops["custom ops"] += 1
            counter.muted += 1
            try:
                return op(*args, **kwargs)
            finally:
                counter.muted -= 1

        return call

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(gqn_fast.model, "use_triton", lambda tensor: True))
        for name in CUSTOM_OPS:
            stack.enter_context(mock.patch.object(gqn_fast.model, name, counted(getattr(gqn_fast.model, name))))
        yield


def autograd_nodes(tensor: torch.Tensor) -> int:
    """The nodes of tensor's autograd graph (AccumulateGrad included): what backward runs."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [next_node for next_node, _ in node.next_functions]
    return len(seen)


def meta_batch(batch: int, context_views: int = 3):
    device = torch.device("meta")
    return (
        torch.empty(batch, context_views, 3, 64, 64, device=device),
        transform_viewpoint(torch.empty(batch, context_views, 5, device=device)),
        torch.empty(batch, 3, 64, 64, device=device),
        transform_viewpoint(torch.empty(batch, 5, device=device)),
    )


def count_training_step(model: torch.nn.Module, batch: int) -> dict:
    """{ops, views, custom ops, autograd nodes} of model.elbo(...).loss and its backward's graph;
    the model is moved to the meta device (pass a fresh one), gqn_fast.GQN on its GPU branches."""
    model = model.to("meta")
    inputs = meta_batch(batch)
    fast = isinstance(model, gqn_fast.model.GQN)
    for counter in (_Counter(), _Counter()):  # the first fills the model's caches: the second counts
        with counter, (gpu_branches(counter) if fast else contextlib.nullcontext()):
            loss = model.elbo(*inputs, sigma=0.7).loss
    counts = {"ops": counter.ops["ops"], "views": counter.ops["views"], "custom ops": counter.ops["custom ops"]}
    counts["autograd nodes"] = autograd_nodes(loss)
    return counts
