"""The plain PyTorch GQN, installed as gqn_fast.reference: the oracle of every test."""

from gqn_fast.reference.attention import AttentionGQN, attend
from gqn_fast.reference.cores import ConvLSTMCell, GeneratorCore, InferenceCore
from gqn_fast.reference.distributions import gaussian_kl, gaussian_nll
from gqn_fast.reference.gqn import ELBO, GQN
from gqn_fast.reference.representation import NETS, Pool, Pyramid, Tower
from gqn_fast.reference.viewpoint import transform_viewpoint

__all__ = [
    "AttentionGQN",
    "ConvLSTMCell",
    "ELBO",
    "GQN",
    "GeneratorCore",
    "InferenceCore",
    "NETS",
    "Pool",
    "Pyramid",
    "Tower",
    "attend",
    "gaussian_kl",
    "gaussian_nll",
    "transform_viewpoint",
]
