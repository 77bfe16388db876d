"""Random scenes and cameras of the built-in families, deterministic from (seed, split, index).

- rooms: a square room (floor and walls in random colours), 1 to 3 objects (sphere, box or
  cylinder) of random colour, size, position and turn; the camera on a ring at a fixed
  height, looking at the centre of the floor; T = 10 views (DeepMind's rooms_ring_camera).
- shepard_metzler (5 parts) and shepard_metzler_7 (7 parts): unit cubes joined face to face
  in a random self-avoiding chain, a random colour per cube, on a plain background; the
  camera at a fixed distance on a sphere around the shape's centre; T = 15 views.

Every scene draws from its own generator seeded with (seed, split, index), so scene i is
the same whatever the chunking, the number of workers or the device that renders it.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gqn_fast.data.camera import FOV_DEGREES, look_at
from gqn_fast.data.catalog import HOLDOUTS, SPLITS
from gqn_fast.data.render import Box, Cylinder, Room, Scene, Sphere, render
from gqn_fast.errors import UsageError, check_count

ROOM_HALF_SIZE = 4.0
RING_RADIUS = 3.0
RING_HEIGHT = 1.4
# Objects (their footprint included) stay inside this disc, well clear of the camera ring.
OBJECT_DISC = 2.2
SM_BACKGROUND = (0.1, 0.1, 0.1)


@dataclass(frozen=True)
class Family:
    name: str
    num_views: int
    sample: Callable[[np.random.Generator, int], tuple[Scene, np.ndarray]]  # -> scene, cameras [T, 5]


def _colour(rng: np.random.Generator, saturation=(0.5, 1.0), value=(0.6, 1.0)) -> tuple:
    h, s, v = rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)
    return tuple(float(x) for x in colorsys.hsv_to_rgb(h, s, v))


def _light(rng: np.random.Generator) -> tuple:
    azimuth = rng.uniform(-math.pi, math.pi)
    elevation = rng.uniform(math.radians(35), math.radians(70))
    return (
        math.cos(elevation) * math.cos(azimuth),
        math.cos(elevation) * math.sin(azimuth),
        math.sin(elevation),
    )


def _cameras_looking_at(positions: np.ndarray, target) -> np.ndarray:
    cams = look_at(torch.from_numpy(positions), torch.tensor(target, dtype=torch.float64))
    return cams.numpy().astype(np.float32)


def check_holdout(holdout: str | None) -> None:
    if holdout is not None and holdout not in HOLDOUTS:
        raise UsageError(f"holdout: expected one of {sorted(HOLDOUTS)} or None, got {holdout!r}")


def sample_room(rng: np.random.Generator, num_views: int, exclude=None) -> tuple[Scene, np.ndarray]:
    """A room scene and its cameras. `exclude(kind, colour)`: objects it is true of are
    redrawn in another colour (a held-out combination, see HOLDOUTS)."""
    shapes, footprints = [], []
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 3))
        size = float(rng.uniform(0.35, 0.65))
        footprint = size * math.sqrt(2.0) if kind == 1 else size
        # Rejection-sample a spot on the floor that overlaps no earlier object.
        for _attempt in range(100):
            radius = (OBJECT_DISC - footprint) * math.sqrt(rng.uniform(0, 1))
            angle = rng.uniform(-math.pi, math.pi)
            x, y = radius * math.cos(angle), radius * math.sin(angle)
            if all(math.hypot(x - a, y - b) > footprint + f + 0.1 for a, b, f in footprints):
                break
        else:
            continue
        footprints.append((x, y, footprint))
        colour = _colour(rng)
        while exclude is not None and exclude(kind, colour):
            colour = _colour(rng)
        if kind == 0:
            shapes.append(Sphere((x, y, size), size, colour))
        elif kind == 1:
            shapes.append(Box((x, y, size), (size, size, size), float(rng.uniform(0, math.pi / 2)), colour))
        else:
            height = float(rng.uniform(0.6, 1.4))
            shapes.append(Cylinder((x, y, 0.0), size, height, colour))
    room = Room(
        ROOM_HALF_SIZE,
        floor_colour=_colour(rng, saturation=(0.1, 0.6), value=(0.5, 0.9)),
        wall_colour=_colour(rng, saturation=(0.1, 0.7), value=(0.5, 1.0)),
    )
    scene = Scene(tuple(shapes), _light(rng), room=room)
    angles = rng.uniform(-math.pi, math.pi, size=num_views)
    positions = np.stack(
        [RING_RADIUS * np.cos(angles), RING_RADIUS * np.sin(angles), np.full(num_views, RING_HEIGHT)], -1
    )
    return scene, _cameras_looking_at(positions, (0.0, 0.0, 0.0))


def _chain_of_cubes(rng: np.random.Generator, parts: int) -> list[tuple[int, int, int]]:
    steps = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    while True:
        cells = [(0, 0, 0)]
        while len(cells) < parts:
            last = cells[-1]
            free = [(last[0] + a, last[1] + b, last[2] + c) for a, b, c in steps]
            free = [cell for cell in free if cell not in cells]
            if not free:
                break  # boxed in; start again
            cells.append(free[int(rng.integers(0, len(free)))])
        if len(cells) == parts:
            return cells


def _sample_shepard_metzler(rng: np.random.Generator, num_views: int, parts: int, distance: float):
    cells = np.asarray(_chain_of_cubes(rng, parts), dtype=np.float64)
    cells -= cells.mean(axis=0)
    shapes = tuple(Box(tuple(float(v) for v in c), (0.5, 0.5, 0.5), 0.0, _colour(rng)) for c in cells)
    scene = Scene(shapes, _light(rng), room=None, background=SM_BACKGROUND)
    # Uniform on the sphere's band within 70 degrees of the equator.
    yaw = rng.uniform(-math.pi, math.pi, size=num_views)
    elevation = np.arcsin(rng.uniform(-1, 1, size=num_views) * math.sin(math.radians(70)))
    positions = distance * np.stack(
        [np.cos(elevation) * np.cos(yaw), np.cos(elevation) * np.sin(yaw), np.sin(elevation)], -1
    )
    return scene, _cameras_looking_at(positions, (0.0, 0.0, 0.0))


# Camera distances: a chain's farthest corner from its centre is at most sqrt(((n-1)/2 + 1/2)^2 + 1/2),
# 2.6 for 5 cubes and 3.6 for 7, which subtends less than half the field of view from here.
def sample_shepard_metzler_5(rng, num_views):
    return _sample_shepard_metzler(rng, num_views, parts=5, distance=5.3)


def sample_shepard_metzler_7(rng, num_views):
    return _sample_shepard_metzler(rng, num_views, parts=7, distance=7.2)


FAMILIES = {
    "rooms": Family("rooms", 10, sample_room),
    "shepard_metzler": Family("shepard_metzler", 15, sample_shepard_metzler_5),
    "shepard_metzler_7": Family("shepard_metzler_7", 15, sample_shepard_metzler_7),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UsageError(f"family: expected one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    check_count("seed", seed, 0)
    if split not in SPLITS:
        raise UsageError(f"split: expected one of {SPLITS}, got {split!r}")
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sample_scenes(family: str, seed: int, split: str, start: int, stop: int, holdout: str | None = None):
    """Scenes start..stop-1 of a split: (list of Scene, cameras float32 [n, T, 5]).

    holdout: a name in HOLDOUTS (rooms only): the train split never shows that combination,
    the test split shows it as often as chance has it.
    """
    fam = get_family(family)
    check_holdout(holdout)
    extra = {}
    if holdout is not None:
        if family != "rooms":
            raise UsageError(f"holdout: only the rooms family has held-out combinations, got family {family!r}")
        extra["exclude"] = HOLDOUTS[holdout] if split == "train" else None
    scenes, cameras = [], []
    for index in range(start, stop):
        scene, cams = fam.sample(scene_rng(seed, split, index), fam.num_views, **extra)
        scenes.append(scene)
        cameras.append(cams)
    return scenes, np.stack(cameras) if cameras else np.zeros((0, fam.num_views, 5), np.float32)


def render_scenes(family: str, seed: int, split: str, start: int, stop: int, device=None, holdout=None):
    """Scenes start..stop-1 of a split, rendered: (images uint8 [n, T, 64, 64, 3], cameras float32 [n, T, 5]) as numpy."""
    scenes, cameras = sample_scenes(family, seed, split, start, stop, holdout)
    images = render(scenes, torch.from_numpy(cameras), image_size=64, fov=FOV_DEGREES, device=device)
    return images.cpu().numpy(), cameras
