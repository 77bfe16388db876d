"""A vectorised ray caster for the built-in scenes, in plain PyTorch (CPU or GPU alike).

One primary ray per pixel is cast from the camera (camera.py fixes the conventions) and
intersected analytically with the scene: the inside of a square room (four walls and a floor)
or a plain background, and spheres, boxes turned about the vertical axis and upright
cylinders. The closest hit is shaded Lambertian with one directional light plus an ambient
term; in rooms a shadow ray towards the light is tested against the objects.

Speed comes from batching: a scene's shapes become tensors, scenes with the same number of
spheres, boxes and cylinders are rendered together, and each shape costs a few dozen
element-wise operations over [images, pixels] tensors, in chunks that stay in cache.
Everything is float32 and deterministic for a given device.

On a CPU, render on one thread per process (torch.set_num_threads(1) in a worker, as
builtin.make_dataset does): these operations are too short for OpenMP to pay off, and on a
busy machine its barriers (sqrt, round and the matmul go parallel from a few thousand
elements) make them up to 20x slower.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gqn_fast.data.camera import FOV_DEGREES, camera_axes, pixel_rays

# Share of the light that reaches every surface, lit or not.
AMBIENT = 0.4
# Shadow rays start this far along the light, so a surface does not shadow itself.
SHADOW_EPS = 1e-3
# Pixels per element-wise operation: big enough to amortise dispatch, small enough for the
# CPU's cache; a GPU wants far more in flight.
CHUNK_PIXELS = {"cpu": 1 << 17, "cuda": 1 << 22}


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    colour: tuple[float, float, float]  # RGB in [0, 1]


@dataclass(frozen=True)
class Box:
    centre: tuple[float, float, float]
    half_size: tuple[float, float, float]
    yaw: float  # turn about the vertical axis, radians
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Cylinder:
    base: tuple[float, float, float]  # centre of the bottom disc; the axis is vertical
    radius: float
    height: float
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Room:
    """The inside of the square prism |x|, |y| <= half_size over the floor z = 0, walls unbounded."""

    half_size: float
    floor_colour: tuple[float, float, float]
    wall_colour: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    shapes: tuple  # of Sphere, Box, Cylinder
    light: tuple[float, float, float]  # unit vector towards the light
    room: Room | None = None
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # where a ray hits nothing


def render(
    scenes: Sequence[Scene],
    cameras: torch.Tensor,
    image_size: int = 64,
    fov: float = FOV_DEGREES,
    device=None,
    chunk_pixels: int | None = None,
) -> torch.Tensor:
    """Render each scene from each of its cameras.

    scenes: S scenes; cameras: [S, V, 5] (x, y, z, yaw, pitch).
    chunk_pixels: pixels per batched operation (default: per device type, CHUNK_PIXELS).
    Returns uint8 [S, V, image_size, image_size, 3] on `device` (default: the cameras' device).
    """
    if not isinstance(cameras, torch.Tensor) or cameras.dim() != 3 or cameras.shape[-1] != 5:
        shape = list(cameras.shape) if isinstance(cameras, torch.Tensor) else type(cameras).__name__
        raise ValueError(f"cameras: expected a tensor [S, V, 5], got {shape}")
    if len(scenes) != cameras.shape[0]:
        raise ValueError(f"cameras: expected {len(scenes)} scenes in dim 0, got {cameras.shape[0]}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    device = torch.device(device) if device is not None else cameras.device
    num_scenes, num_views = cameras.shape[:2]
    out = torch.empty(num_scenes, num_views, image_size * image_size, 3, dtype=torch.uint8, device=device)
    if chunk_pixels is None:
        chunk_pixels = CHUNK_PIXELS.get(device.type, CHUNK_PIXELS["cuda"])
    rays = pixel_rays(image_size, fov, device=device)
    cameras = cameras.to(device=device, dtype=torch.float32)
    with torch.inference_mode():
        for layout, group in _group_by_layout(scenes).items():
            params = _stack_group([scenes[i] for i in group], device)
            scene_ids = torch.tensor(group, device=device)
            # Rows of `images`: every (scene, view) of the group, in chunks of whole images.
            per_chunk = max(1, chunk_pixels // (image_size * image_size))
            flat = torch.arange(len(group) * num_views, device=device)
            for start in range(0, flat.numel(), per_chunk):
                rows = flat[start : start + per_chunk]
                scene_of_row, view_of_row = rows // num_views, rows % num_views
                cams = cameras[scene_ids[scene_of_row], view_of_row]
                rgb = _render_images(cams, params.select(scene_of_row), rays, layout)
                out[scene_ids[scene_of_row], view_of_row] = rgb
    return out.view(num_scenes, num_views, image_size, image_size, 3)


# ----------------------------------------------------------------------------------------
# Scene -> tensors


def _layout(scene: Scene) -> tuple[bool, int, int, int, bool]:
    """(has a room, spheres, boxes, cylinders, every box axis-aligned): scenes alike render together."""
    counts = [0, 0, 0]
    for shape in scene.shapes:
        if isinstance(shape, Sphere):
            counts[0] += 1
        elif isinstance(shape, Box):
            counts[1] += 1
        elif isinstance(shape, Cylinder):
            counts[2] += 1
        else:
            raise TypeError(f"scene.shapes: expected Sphere, Box or Cylinder, got {type(shape).__name__}")
    aligned = all(shape.yaw == 0.0 for shape in scene.shapes if isinstance(shape, Box))
    return (scene.room is not None, *counts, aligned)


def _group_by_layout(scenes: Sequence[Scene]) -> dict:
    groups = defaultdict(list)
    for i, scene in enumerate(scenes):
        groups[_layout(scene)].append(i)
    return groups


@dataclass
class _Params:
    """Per-scene tensors of one layout group; `select` picks rows (one per image)."""

    light: torch.Tensor  # [G, 3]
    palette: torch.Tensor  # [G, 2 + shapes, 3]: background-or-floor, wall, spheres, boxes, cylinders
    room_half: torch.Tensor  # [G]
    sphere: torch.Tensor  # [G, ns, 4]: centre, radius
    box: torch.Tensor  # [G, nb, 7]: centre, half size, yaw
    cylinder: torch.Tensor  # [G, nc, 5]: base, radius, height

    def select(self, rows: torch.Tensor) -> _Params:
        return _Params(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def _stack_group(scenes: Sequence[Scene], device) -> _Params:
    light, palette, room_half, spheres, boxes, cylinders = [], [], [], [], [], []
    for scene in scenes:
        light.append(scene.light)
        room = scene.room
        colours = [room.floor_colour, room.wall_colour] if room else [scene.background, scene.background]
        s = [x for x in scene.shapes if isinstance(x, Sphere)]
        b = [x for x in scene.shapes if isinstance(x, Box)]
        c = [x for x in scene.shapes if isinstance(x, Cylinder)]
        colours += [x.colour for x in s + b + c]
        palette.append(colours)
        room_half.append(room.half_size if room else 0.0)
        spheres.append([(*x.centre, x.radius) for x in s])
        boxes.append([(*x.centre, *x.half_size, x.yaw) for x in b])
        cylinders.append([(*x.base, x.radius, x.height) for x in c])

    def tensor(rows, width):
        array = np.asarray(rows, dtype=np.float32).reshape(len(scenes), -1, width)
        return torch.from_numpy(array).to(device)

    return _Params(
        light=torch.tensor(light, dtype=torch.float32, device=device),
        palette=torch.tensor(palette, dtype=torch.float32, device=device),
        room_half=torch.tensor(room_half, dtype=torch.float32, device=device),
        sphere=tensor(spheres, 4),
        box=tensor(boxes, 7),
        cylinder=tensor(cylinders, 5),
    )


# ----------------------------------------------------------------------------------------
# Ray casting. Per-image values are [I, 1] columns, per-pixel values [I, P].


class _Hits:
    """The closest hit so far per pixel: distance, material (palette index) and n . light."""

    def __init__(self, t, material, shade):
        self.t, self.material, self.shade = t, material, shade

    def offer(self, t, shade, material: int) -> None:
        closer = t < self.t
        self.t = torch.where(closer, t, self.t)
        self.shade = torch.where(closer, shade, self.shade)
        self.material.masked_fill_(closer, material)


def _render_images(cams, p: _Params, rays, layout) -> torch.Tensor:
    """cams [I, 5], one scene's tensors per image -> uint8 [I, P, 3]."""
    has_room, axis_aligned = layout[0], layout[4]
    forward, right, up = camera_axes(cams)
    basis = torch.stack([forward, right, up], dim=2)  # [I, xyz, (f, r, u)]
    d = torch.matmul(basis, rays)  # [I, 3, P] unit ray directions
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    ox, oy, oz = cams[:, 0:1], cams[:, 1:2], cams[:, 2:3]
    light = p.light
    lx, ly, lz = light[:, 0:1], light[:, 1:2], light[:, 2:3]
    inv_dz = dz.reciprocal()
    # Axis-aligned boxes share the ray's reciprocal direction instead of turning it per box.
    inv_d = (dx.reciprocal(), dy.reciprocal(), inv_dz) if axis_aligned else None

    if has_room:
        half = p.room_half.unsqueeze(1)
        tx = (torch.copysign(half, dx) - ox) / dx
        ty = (torch.copysign(half, dy) - oy) / dy
        x_wall = tx < ty
        t = torch.minimum(tx, ty)
        # Walls face into the room, against the ray.
        shade = torch.where(x_wall, _facing(lx, dx), _facing(ly, dy))
        floor_t = torch.where(dz < 0, -oz * inv_dz, torch.inf)
        floor = floor_t < t
        hits = _Hits(torch.where(floor, floor_t, t), floor.logical_not().to(torch.uint8), torch.where(floor, lz, shade))
    else:
        shape = dx.shape
        hits = _Hits(
            torch.full(shape, torch.inf, device=dx.device),
            torch.zeros(shape, dtype=torch.uint8, device=dx.device),
            torch.ones(shape, device=dx.device),
        )

    material = 2
    for k in range(p.sphere.shape[1]):
        centre, radius = p.sphere[:, k, :3], p.sphere[:, k, 3:4]
        t, shade = _sphere_hit((ox, oy, oz), (dx, dy, dz), centre, radius, light)
        hits.offer(t, shade, material)
        material += 1
    for k in range(p.box.shape[1]):
        t, shade = _box_hit((ox, oy, oz), (dx, dy, dz), p.box[:, k], light, inv_d)
        hits.offer(t, shade, material)
        material += 1
    for k in range(p.cylinder.shape[1]):
        t, shade = _cylinder_hit((ox, oy, oz), (dx, dy, dz), inv_dz, p.cylinder[:, k], light)
        hits.offer(t, shade, material)
        material += 1

    diffuse = hits.shade.clamp_(min=0.0)
    if has_room and material > 2:
        # Shadow rays from every visible point towards the light.
        px, py, pz = ox + hits.t * dx, oy + hits.t * dy, oz + hits.t * dz
        lit = _unoccluded((px, py, pz), p, light)
        diffuse = diffuse * lit
    intensity = AMBIENT + (1.0 - AMBIENT) * diffuse
    if not has_room:
        intensity = torch.where(hits.material == 0, 1.0, intensity)  # the background is unshaded
    index = hits.material.long().unsqueeze(-1).expand(-1, -1, 3)
    colour = torch.gather(p.palette, 1, index)  # [I, P, 3]
    return colour.mul_(intensity.unsqueeze(-1)).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _facing(light_component, direction_component):
    """n . light for an axis-aligned face hit by a ray: the normal opposes the ray on that axis."""
    return torch.where(direction_component > 0, -light_component, light_component)


def _sphere_hit(o, d, centre, radius, light):
    ocx, ocy, ocz = o[0] - centre[:, 0:1], o[1] - centre[:, 1:2], o[2] - centre[:, 2:3]
    b = d[0] * ocx + d[1] * ocy + d[2] * ocz
    c = ocx * ocx + ocy * ocy + ocz * ocz - radius * radius
    disc = b * b - c
    t = -b - disc.clamp(min=0.0).sqrt()
    t = torch.where((disc > 0) & (t > 0), t, torch.inf)
    # n . light with n = (o + t d - centre) / radius
    lx, ly, lz = light[:, 0:1], light[:, 1:2], light[:, 2:3]
    d_light = d[0] * lx + d[1] * ly + d[2] * lz
    shade = (ocx * lx + ocy * ly + ocz * lz + t * d_light) / radius
    return t, shade


def _slab(origin, inv_direction, lo, hi):
    """Ray parameter interval inside lo <= origin + t * direction <= hi (any broadcast)."""
    a = (lo - origin) * inv_direction
    b = (hi - origin) * inv_direction
    return torch.minimum(a, b), torch.maximum(a, b)


def _to_box_frame(x, y, box):
    """Rotate world-frame x, y offsets by -yaw into the box's frame."""
    cos, sin = box[:, 6:7].cos(), box[:, 6:7].sin()
    return cos * x + sin * y, cos * y - sin * x


def _box_hit(o, d, box, light, inv_d=None):
    """inv_d: the ray's reciprocal direction, given when the box is axis-aligned (yaw 0)."""
    cx, cy, cz = box[:, 0:1], box[:, 1:2], box[:, 2:3]
    hx, hy, hz = box[:, 3:4], box[:, 4:5], box[:, 5:6]
    lz = light[:, 2:3]
    if inv_d is None:
        oxl, oyl = _to_box_frame(o[0] - cx, o[1] - cy, box)
        dxl, dyl = _to_box_frame(d[0], d[1], box)
        lxl, lyl = _to_box_frame(light[:, 0:1], light[:, 1:2], box)
        inv_x, inv_y, inv_z = dxl.reciprocal(), dyl.reciprocal(), d[2].reciprocal()
    else:
        oxl, oyl, dxl, dyl = o[0] - cx, o[1] - cy, d[0], d[1]
        lxl, lyl = light[:, 0:1], light[:, 1:2]
        inv_x, inv_y, inv_z = inv_d
    nx, fx = _slab(oxl, inv_x, -hx, hx)
    ny, fy = _slab(oyl, inv_y, -hy, hy)
    nz, fz = _slab(o[2] - cz, inv_z, -hz, hz)
    near = torch.maximum(torch.maximum(nx, ny), nz)
    far = torch.minimum(torch.minimum(fx, fy), fz)
    t = torch.where((near <= far) & (near > 0), near, torch.inf)
    # The entry face is the slab entered last; its normal opposes the ray on that axis.
    shade = torch.where(
        nx >= torch.maximum(ny, nz),
        _facing(lxl, dxl),
        torch.where(ny >= nz, _facing(lyl, dyl), _facing(lz, d[2])),
    )
    return t, shade


def _cylinder_hit(o, d, inv_dz, cyl, light):
    bx, by, bz, radius, height = (cyl[:, i : i + 1] for i in range(5))
    ocx, ocy = o[0] - bx, o[1] - by
    a = d[0] * d[0] + d[1] * d[1]
    b = d[0] * ocx + d[1] * ocy
    c = ocx * ocx + ocy * ocy - radius * radius
    disc = b * b - a * c
    root = disc.clamp(min=0.0).sqrt()
    side_in, side_out = (-b - root) / a, (-b + root) / a
    cap_in, cap_out = _slab(o[2], inv_dz, bz, bz + height)
    near = torch.maximum(side_in, cap_in)
    far = torch.minimum(side_out, cap_out)
    t = torch.where((disc > 0) & (near <= far) & (near > 0), near, torch.inf)
    lx, ly, lz = light[:, 0:1], light[:, 1:2], light[:, 2:3]
    side_shade = ((ocx + t * d[0]) * lx + (ocy + t * d[1]) * ly) / radius
    shade = torch.where(side_in >= cap_in, side_shade, _facing(lz, d[2]))
    return t, shade


def _unoccluded(point, p: _Params, light) -> torch.Tensor:
    """1.0 where the ray from `point` towards the light misses every shape, else 0.0."""
    px, py, pz = point
    lx, ly, lz = light[:, 0:1], light[:, 1:2], light[:, 2:3]
    blocked = torch.zeros(px.shape, dtype=torch.bool, device=px.device)
    for k in range(p.sphere.shape[1]):
        s = p.sphere[:, k]
        qx, qy, qz = px - s[:, 0:1], py - s[:, 1:2], pz - s[:, 2:3]
        b = qx * lx + qy * ly + qz * lz
        disc = b * b - (qx * qx + qy * qy + qz * qz - s[:, 3:4] * s[:, 3:4])
        far = disc.clamp(min=0.0).sqrt() - b
        blocked |= (disc > 0) & (far > SHADOW_EPS)
    for k in range(p.box.shape[1]):
        box = p.box[:, k]
        qx, qy = _to_box_frame(px - box[:, 0:1], py - box[:, 1:2], box)
        lxl, lyl = _to_box_frame(lx, ly, box)
        hx, hy, hz = box[:, 3:4], box[:, 4:5], box[:, 5:6]
        nx, fx = _slab(qx, lxl.reciprocal(), -hx, hx)
        ny, fy = _slab(qy, lyl.reciprocal(), -hy, hy)
        nz, fz = _slab(pz - box[:, 2:3], lz.reciprocal(), -hz, hz)
        near = torch.maximum(torch.maximum(nx, ny), nz)
        far = torch.minimum(torch.minimum(fx, fy), fz)
        blocked |= (near <= far) & (far > SHADOW_EPS)
    for k in range(p.cylinder.shape[1]):
        cyl = p.cylinder[:, k]
        qx, qy, radius = px - cyl[:, 0:1], py - cyl[:, 1:2], cyl[:, 3:4]
        a = lx * lx + ly * ly
        b = qx * lx + qy * ly
        disc = b * b - a * (qx * qx + qy * qy - radius * radius)
        root = disc.clamp(min=0.0).sqrt()
        z_in, z_out = _slab(pz, lz.reciprocal(), cyl[:, 2:3], cyl[:, 2:3] + cyl[:, 4:5])
        near = torch.maximum((-b - root) / a, z_in)
        far = torch.minimum((-b + root) / a, z_out)
        blocked |= (disc > 0) & (near <= far) & (far > SHADOW_EPS)
    return blocked.logical_not().float()
