"""Camera maths shared by the renderer, the scene samplers and the tests.

A camera is (x, y, z, yaw, pitch), angles in radians, in a right-handed world with z up
(docs/spec.md, "Viewpoints"). The camera looks along
    forward = (cos pitch cos yaw, cos pitch sin yaw, sin pitch),
so yaw 0 looks along +x, yaw pi/2 along +y, and a positive pitch looks up. The image's
right is forward x z (so +y is on the left of a camera looking along +x) and its up is
right x forward. The projection is a pinhole with a square image and a vertical (= horizontal)
field of view `fov` in degrees. Pixel (row, col) has its centre at (row + 0.5, col + 0.5):
row 0 is the top of the image.
"""

from __future__ import annotations

import math

import torch

# One field of view for every built-in family: wide enough to see a room's far corner.
FOV_DEGREES = 60.0


def _check_cameras(cameras: torch.Tensor, name: str = "cameras") -> None:
    if not isinstance(cameras, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cameras).__name__}")
    if cameras.shape[-1:] != (5,):
        raise ValueError(f"{name}: expected shape [..., 5] (x, y, z, yaw, pitch), got {list(cameras.shape)}")


def camera_axes(cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 5] cameras -> (forward, right, up), each [..., 3] and of unit length."""
    _check_cameras(cameras)
    yaw, pitch = cameras[..., 3], cameras[..., 4]
    cy, sy, cp, sp = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()
    forward = torch.stack([cp * cy, cp * sy, sp], dim=-1)
    right = torch.stack([sy, -cy, torch.zeros_like(sy)], dim=-1)
    up = torch.stack([-sp * cy, -sp * sy, cp], dim=-1)
    return forward, right, up


def look_at(position: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cameras [..., 5] at `position` [..., 3] looking at `target` [..., 3] (broadcast)."""
    delta = torch.as_tensor(target, dtype=position.dtype) - position
    yaw = torch.atan2(delta[..., 1], delta[..., 0])
    pitch = torch.atan2(delta[..., 2], delta[..., :2].norm(dim=-1))
    return torch.cat([position, yaw.unsqueeze(-1), pitch.unsqueeze(-1)], dim=-1)


def focal_scale(fov: float = FOV_DEGREES) -> float:
    """tan(fov / 2): the half-width of the image plane at distance 1."""
    if not 0.0 < fov < 180.0:
        raise ValueError(f"fov: expected degrees in (0, 180), got {fov}")
    return math.tan(math.radians(fov) / 2.0)


def pixel_rays(image_size: int, fov: float = FOV_DEGREES, device=None) -> torch.Tensor:
    """[3, P] coefficients (a, b, c) of each pixel's unit ray direction a*forward + b*right + c*up.

    P = image_size**2 in row-major order (row 0 at the top)."""
    scale = focal_scale(fov)
    centres = (torch.arange(image_size, dtype=torch.float64, device=device) + 0.5) / image_size
    across = (2.0 * centres - 1.0) * scale  # left to right
    down = (1.0 - 2.0 * centres) * scale  # top to bottom: +scale at row 0
    b = across.repeat(image_size)
    c = down.repeat_interleave(image_size)
    a = torch.rsqrt(1.0 + b * b + c * c)
    return torch.stack([a, a * b, a * c]).float()


def project(
    points: torch.Tensor, cameras: torch.Tensor, image_size: int, fov: float = FOV_DEGREES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points [..., 3] seen by cameras [..., 5] -> (row, col, depth), each [...].

    row and col are continuous pixel coordinates (pixel (i, j) covers [i, i+1) x [j, j+1));
    depth is the distance along the camera's forward axis (negative: behind the camera)."""
    _check_cameras(cameras)
    if points.shape[-1:] != (3,):
        raise ValueError(f"points: expected shape [..., 3], got {list(points.shape)}")
    forward, right, up = camera_axes(cameras)
    delta = points - cameras[..., :3]
    depth = (delta * forward).sum(-1)
    across = (delta * right).sum(-1) / depth / focal_scale(fov)
    height = (delta * up).sum(-1) / depth / focal_scale(fov)
    col = (across + 1.0) * 0.5 * image_size
    row = (1.0 - height) * 0.5 * image_size
    return row, col, depth
