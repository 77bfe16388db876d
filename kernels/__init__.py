"""Fused Triton kernels for GQN, each a torch.library custom op (installed as gqn_fast.kernels).

- conv_lstm_gates(preact, c) -> (h, c_new)                    kernels/conv_lstm.py
- conv_gates(x, weight, constant, c) -> (h, c_new)             kernels/implicit_gemm.py
  (the Ky x Kx conv of a ConvLSTM cell with the gates in its epilogue; any odd sizes)
- gaussian_sample_kl(mu_q, s_q, mu_p, s_p, eps) -> (z, kl)    kernels/gaussian.py
- gaussian_kl(mu_q, s_q, mu_p, s_p) -> kl                     kernels/gaussian.py
- elementwise_gaussian_kl_from_sigma(mu_q, sigma_q, mu_p, sigma_p) -> kl (per element)
                                                               kernels/gaussian.py
- gaussian_nll(x, logits, sigma) -> nll                       kernels/pixel_nll.py

CUDA tensors run the Triton kernels; CPU tensors run the same math in PyTorch, or the Triton
kernels under the interpreter when TRITON_INTERPRET=1 is set before import (kernels/utils.py:
use_triton).
Per-sample sums (kl, nll) are fp32 whatever the input dtype (fp64 for fp64 inputs).
"""

from .implicit_gemm import conv_gates
from .conv_lstm import conv_lstm_gates
from .gaussian import elementwise_gaussian_kl_from_sigma, gaussian_kl, gaussian_sample_kl
from .pixel_nll import gaussian_nll
from .utils import interpreter_enabled, use_triton

__all__ = [
    "conv_gates",
    "conv_lstm_gates",
    "elementwise_gaussian_kl_from_sigma",
    "gaussian_kl",
    "gaussian_nll",
    "gaussian_sample_kl",
    "interpreter_enabled",
    "use_triton",
]
