"""The camera (x, y, z, yaw, pitch) -> the 7-d viewpoint vector the network sees."""

import torch


def transform_viewpoint(camera: torch.Tensor) -> torch.Tensor:
    """[..., 5] (x, y, z, yaw, pitch), radians -> [..., 7] (x, y, z, cos yaw, sin yaw, cos pitch, sin pitch).

    The paper's order: cos before sin. (DeepMind's own reader emits sin first; we do not.)
    """
    if camera.shape[-1] != 5:
        raise ValueError(
            f"camera: expected a last dimension of 5 (x, y, z, yaw, pitch), got shape {list(camera.shape)}"
        )
    position, yaw, pitch = camera[..., :3], camera[..., 3:4], camera[..., 4:5]
    return torch.cat([position, yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()], dim=-1)
