"""Fused Triton kernels for GQN, each a torch.library custom op (installed as gqn_fast.kernels).

- lstm_gates(preact, c, constant=None) -> (h, c_new)           kernels/gates.py
  (the ConvLSTM gate math on preactivations a convolution made, plus a constant if given)
- conv_lstm_cell(x, weight, constant, c) -> (h, c_new)         kernels/conv_cell.py
  (a ConvLSTM cell: the Ky x Kx conv with the gates in its epilogue; any odd sizes)
- posterior_sample_kl(mu_q, s_q, mu_p, s_p, eps) -> (z, kl)    kernels/gaussian.py
  (s: pre-softplus scales; kl summed per sample)
- posterior_kl(mu_q, s_q, mu_p, s_p) -> kl                     kernels/gaussian.py
- elementwise_gaussian_kl_from_sigma(mu_q, sigma_q, mu_p, sigma_p) -> kl per element
                                                               kernels/gaussian.py
- pixel_nll(x, logits, sigma) -> nll per sample                kernels/pixel_likelihood.py
  (the image mean is sigmoid(logits))

CUDA tensors run the Triton kernels; CPU tensors run the same math in PyTorch, or the Triton
kernels under the interpreter when TRITON_INTERPRET=1 is set before import (kernels/utils.py:
use_triton). The elementwise ops decide once per call, in their public function: custom_op=
"always" (the default) runs the torch.library op on every device, "auto" only where the kernels
run and elsewhere the op's PyTorch form through autograd (kernels/utils.py: use_custom_op);
conv_lstm_cell always runs its op.
Per-sample sums (kl, nll) are fp32 whatever the input dtype (fp64 for fp64 inputs).
"""

from .conv_cell import conv_lstm_cell
from .gates import lstm_gates
from .gaussian import elementwise_gaussian_kl_from_sigma, posterior_kl, posterior_sample_kl
from .pixel_likelihood import pixel_nll
from .utils import interpreter_enabled, use_triton

__all__ = [
    "conv_lstm_cell",
    "lstm_gates",
    "elementwise_gaussian_kl_from_sigma",
    "posterior_kl",
    "pixel_nll",
    "posterior_sample_kl",
    "interpreter_enabled",
    "use_triton",
]
