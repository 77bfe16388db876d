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
Triton branches are what runs on a GPU: counted on a model built with custom_ops="always"
(`on_gpu_branches`), which calls the custom ops on any device; each is counted once, not the
PyTorch math it runs on meta (a dispatch mode sees an op, not what its kernel does).
"""

from __future__ import annotations

import collections

import torch
from gqn_fast.reference import transform_viewpoint
from torch.utils._python_dispatch import TorchDispatchMode

import gqn_fast.model

# aten ops that only make a new view of existing memory: no kernel on any device.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "permute", "transpose", "t", "unsqueeze",
    "squeeze", "expand", "slice", "select", "split", "split_with_sizes", "unbind", "chunk", "narrow",
    "detach", "alias", "as_strided", "view_as", "diagonal", "unfold", "lift_fresh",
})  # fmt: skip
CUSTOM_OPS_NAMESPACE = "gqn_fast"  # the torch.library namespace of the project's ops


class OpCounter(TorchDispatchMode):
    """Counts what is dispatched while it is on: ops, views, and the project's custom ops by name
    (`custom`); a custom op's own kernel runs with the mode off, so its inner math is not counted."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.custom = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == CUSTOM_OPS_NAMESPACE:
            self.ops["custom ops"] += 1
            self.custom[name] += 1
        else:
            self.ops["views" if name in VIEW_OPS else "ops"] += 1
        return func(*args, **(kwargs or {}))


def on_gpu_branches(model_class, config, **choices) -> torch.nn.Module:
    """model_class(config, **choices) as it runs on a GPU: a fast model with its custom ops on any
    device (custom_ops="always"); the reference as it is."""
    if issubclass(model_class, gqn_fast.model.FastCores):
        choices = {**choices, "custom_ops": "always"}
    return model_class(config, **choices)


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
    the model is moved to the meta device (pass a fresh one, made by on_gpu_branches)."""
    if isinstance(model, gqn_fast.model.FastCores) and model.custom_ops != "always":
        raise ValueError("model: build it with on_gpu_branches, to count the GPU's custom ops")
    model = model.to("meta")
    inputs = meta_batch(batch)
    for counter in (OpCounter(), OpCounter()):  # the first fills the model's caches: the second counts
        with counter:
            loss = model.elbo(*inputs, sigma=0.7).loss
    counts = {"ops": counter.ops["ops"], "views": counter.ops["views"], "custom ops": counter.ops["custom ops"]}
    counts["autograd nodes"] = autograd_nodes(loss)
    return counts
