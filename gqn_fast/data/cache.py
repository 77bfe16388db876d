"""The cache folder: built-in datasets generated on first use and the record indexes of
DeepMind downloads. Plain Python (no torch), for the converter and the indexer."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$GQN_FAST_CACHE, else ~/.cache/gqn_fast."""
    env = os.environ.get("GQN_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gqn_fast"
