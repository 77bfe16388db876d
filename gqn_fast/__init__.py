"""gqn-fast: a fast, tested Generative Query Network.

`from gqn_fast import GQN, GQNConfig`: the fast model, a drop-in for gqn_fast.reference.GQN.
`from gqn_fast import AttentionGQN`: attention GQN, fast (gqn_fast.reference.AttentionGQN: its oracle).

The names are imported on first use (PEP 562): `import gqn_fast.reference` runs this file,
and the oracle must not load what it judges (the fast model, the kernels, Triton).
"""

from __future__ import annotations

import importlib

__all__ = ["AttentionGQN", "GQN", "GQNConfig"]
__version__ = "0.1.0"

_LAZY = {"AttentionGQN": "gqn_fast.attention", "GQN": "gqn_fast.model", "GQNConfig": "gqn_fast.config"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gqn_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
