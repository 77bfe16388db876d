"""Which class computes a config's model: by `GQNConfig.model` (the GQN of 2018 or one of its
successors) and the implementation asked for ("reference": the plain oracle in
gqn_fast.reference; "fast": the same parameters and function, computed the fast way).

Classes are named as "module:Class" and imported when asked for, so that choosing one loads
nothing of the others.
"""

from __future__ import annotations

import importlib

from gqn_fast.config import GQNConfig

IMPLS = ("fast", "reference")

CLASSES = {
    "gqn": {"reference": "gqn_fast.reference.gqn:GQN", "fast": "gqn_fast.model:GQN"},
    "jump": {"reference": "gqn_fast.reference.jump:JUMP", "fast": "gqn_fast.jump:JUMP"},
    "attention": {"reference": "gqn_fast.reference.attention:AttentionGQN", "fast": "gqn_fast.attention:AttentionGQN"},
}


def model_class(config: GQNConfig, impl: str = "fast") -> type:
    """The class that builds `config`'s model in implementation `impl`."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {list(IMPLS)}, got {impl!r}")
    if config.model not in CLASSES:
        raise ValueError(f"model: no implementation of {config.model!r} here; expected one of {sorted(CLASSES)}")
    module, name = CLASSES[config.model][impl].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(config: GQNConfig, impl: str = "fast"):
    """An untrained model of `config` (parameters as the reference initialises them)."""
    return model_class(config, impl)(config)
