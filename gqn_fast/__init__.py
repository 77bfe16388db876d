"""gqn-fast: a fast, tested Generative Query Network."""

from gqn_fast.config import GQNConfig

__all__ = ["GQNConfig"]
__version__ = "0.1.0"
