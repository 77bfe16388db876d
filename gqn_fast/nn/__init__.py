"""Fast drop-in modules for models that are not gqn_fast's own (as Liger-Kernel's for
Hugging Face models): change one import, keep the checkpoints.

- ConvLSTMCell, ConvLSTM: the ConvLSTM of ndrplz/ConvLSTM_pytorch (and its many copies),
  each step one fused conv + gates kernel on CUDA                     gqn_fast/nn/convlstm.py
- functional.normal_kl(q_loc, q_scale, p_loc, p_scale): the elementwise KL of two Normals,
  as torch.distributions.kl_divergence, fused on CUDA                  gqn_fast/nn/functional.py
"""

from . import functional
from .convlstm import ConvLSTM, ConvLSTMCell

__all__ = ["ConvLSTM", "ConvLSTMCell", "functional"]
