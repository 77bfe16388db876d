"""How consistent the views drawn from one scene latent are: `gqn-fast eval` of a Consistent GQN.

A JUMP model (gqn_fast/jump.py) draws one latent z per scene from the prior and renders every
view from it. For each test scene, with its largest context, `latents` z's are drawn, and from
each the query viewpoint v is rendered twice (in one set of targets) and beside it v' = v with
the camera turned by `yaw` radians (the same position: the two views overlap mostly). Then:
- identical_view.same_z_max_abs_diff: the largest pixel difference between the two renders of v
  from one z: 0 when a view rendered twice from one z is the same image.
- identical_view.independent_z_mse: the MSE between v rendered from two independent z's of the
  same scene (the z's drawn next to each other, cyclically): how much the prior's samples vary.
- nearby_view.same_z_mse: the MSE between v and v' rendered from one z; independent_z_mse: the
  same from two independent z's.
- nearby_view.agreement = 1 - same_z_mse / independent_z_mse: how much of the difference between
  two overlapping views drawn independently goes away when they share a z (1: all of it, 0:
  none, as for a model that draws a latent per view); null when independent_z_mse is 0.
MSEs are per pixel and channel, in [0, 1] units, averaged over scenes and latents.
"""

from __future__ import annotations

import torch

from gqn_fast.reference import transform_viewpoint

DEFINITION = (
    "per test scene at the largest context, `latents` scene latents z from the prior; from each, the query "
    "viewpoint v rendered twice and v' (v's camera turned by yaw_rad) once. identical_view: the largest pixel "
    "difference of v rendered twice from one z, and the MSE of v from two independent z's; nearby_view: the MSE "
    "between v and v' from one z and from two independent z's, agreement = 1 - same_z / independent_z"
)
YAW = 0.1  # radians: v' shares most of v's field of view (60 degrees)


def turned(camera: torch.Tensor, yaw: float) -> torch.Tensor:
    """[..., 5] cameras turned by `yaw` radians where they stand."""
    return camera + camera.new_tensor([0.0, 0.0, 0.0, yaw, 0.0])


def targets(query_camera: torch.Tensor) -> torch.Tensor:
    """[B, 3, 7]: each scene's query viewpoint v twice, then v' (v turned by YAW)."""
    v = transform_viewpoint(query_camera)
    return torch.stack([v, v, transform_viewpoint(turned(query_camera, YAW))], dim=1)


def consistency_sums(images: torch.Tensor) -> dict:
    """The measures of one batch of renders [latents, B, 3, 3, 64, 64] of `targets` (latents drawn
    independently), summed over its B scenes (the max over them for the max difference)."""
    other = images.roll(1, dims=0)  # each z beside an independent one of the same scene

    def mse(a, b):  # averaged over the latents, summed over the scenes
        return (a - b).pow(2).mean(dim=(2, 3, 4)).mean(0).sum().item()

    return {
        "same_z_max_abs_diff": (images[:, :, 0] - images[:, :, 1]).abs().max().item(),
        "identical_independent_z_mse": mse(images[:, :, 0], other[:, :, 1]),
        "nearby_same_z_mse": mse(images[:, :, 0], images[:, :, 2]),
        "nearby_independent_z_mse": mse(images[:, :, 0], other[:, :, 2]),
    }


def consistency_metrics(batches: list[dict], scenes: int, latents: int) -> dict:
    """metrics.json's "consistency" from the consistency_sums of batches covering `scenes` scenes."""
    mean = {k: sum(b[k] for b in batches) / scenes for k in batches[0] if k != "same_z_max_abs_diff"}
    same, independent = mean["nearby_same_z_mse"], mean["nearby_independent_z_mse"]
    return {
        "about": DEFINITION,
        "latents": latents,
        "yaw_rad": YAW,
        "identical_view": {
            "same_z_max_abs_diff": max(b["same_z_max_abs_diff"] for b in batches),
            "independent_z_mse": mean["identical_independent_z_mse"],
        },
        "nearby_view": {
            "same_z_mse": same,
            "independent_z_mse": independent,
            "agreement": 1 - same / independent if independent > 0 else None,
        },
    }
