"""gqn-fast: a fast, tested Generative Query Network.

`from gqn_fast import GQN, GQNConfig`: the fast model, a drop-in for gqn_fast.reference.GQN.
"""

from gqn_fast.config import GQNConfig
from gqn_fast.model import GQN

__all__ = ["GQN", "GQNConfig"]
__version__ = "0.1.0"
