"""Fused Triton kernels for GQN, each a torch.library custom op (installed as gqn_fast.kernels)."""
