"""The built-in renderer and scene families: camera conventions, projection, shading, determinism."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gqn_fast.data.camera import FOV_DEGREES, camera_axes, focal_scale, look_at, pixel_rays, project
from gqn_fast.data.render import AMBIENT, Box, Cylinder, Room, Scene, Sphere, render
from gqn_fast.data.scenes import (
    RING_HEIGHT,
    RING_RADIUS,
    SM_BACKGROUND,
    get_family,
    render_scenes,
    sample_scenes,
)

WHITE = (1.0, 1.0, 1.0)


def render_one(scene, camera, size=64):
    return render([scene], torch.tensor([[camera]], dtype=torch.float32), image_size=size)[0, 0].numpy()


def lit(colour, n_dot_l):
    """The expected uint8 colour of a surface of `colour` at n . light (unshadowed)."""
    return np.round(np.asarray(colour) * (AMBIENT + (1 - AMBIENT) * max(0.0, n_dot_l)) * 255)


def mask_of(image, background=(0, 0, 0)):
    return np.any(image != np.asarray(background, np.uint8), axis=-1)


def test_camera_axes_pin_the_convention():
    # yaw 0, pitch 0 looks along +x; +y is on the left, +z is up.
    forward, right, up = camera_axes(torch.tensor([0.0, 0, 0, 0, 0]))
    assert torch.allclose(forward, torch.tensor([1.0, 0, 0]))
    assert torch.allclose(right, torch.tensor([0.0, -1, 0]))
    assert torch.allclose(up, torch.tensor([0.0, 0, 1]))
    forward, _, _ = camera_axes(torch.tensor([0.0, 0, 0, math.pi / 2, 0]))
    assert torch.allclose(forward, torch.tensor([0.0, 1, 0]), atol=1e-6)
    forward, _, _ = camera_axes(torch.tensor([0.0, 0, 0, 0, 0.5]))
    assert torch.allclose(forward, torch.tensor([math.cos(0.5), 0, math.sin(0.5)]))


@pytest.mark.parametrize(
    "centre, camera, where",
    [
        ((5.0, 0.0, 0.0), (0, 0, 0, 0, 0), "centre"),
        ((5.0, 1.5, 0.0), (0, 0, 0, 0, 0), "left"),
        ((5.0, -1.5, 0.0), (0, 0, 0, 0, 0), "right"),
        ((5.0, 0.0, 1.5), (0, 0, 0, 0, 0), "top"),
        ((0.0, 5.0, 0.0), (0, 0, 0, math.pi / 2, 0), "centre"),
        ((5 * math.cos(0.5), 0.0, 5 * math.sin(0.5)), (0, 0, 0, 0, 0.5), "centre"),
    ],
)
def test_a_sphere_appears_where_the_convention_says(centre, camera, where):
    image = render_one(Scene((Sphere(centre, 0.4, WHITE),), light=(0.0, 0.0, 1.0)), camera)
    rows, cols = np.nonzero(mask_of(image))
    row, col = rows.mean(), cols.mean()
    expected = {"centre": (32, 32), "left": (32, None), "right": (32, None), "top": (None, 32)}[where]
    if where == "left":
        assert col < 24
    if where == "right":
        assert col > 40
    if where == "top":
        assert row < 24
    for got, want in zip((row, col), expected):
        if want is not None:
            assert abs(got - want) < 0.75


@given(
    position=st.tuples(*[st.floats(-3, 3)] * 3),
    yaw=st.floats(-math.pi, math.pi),
    pitch=st.floats(-1.2, 1.2),
    depth=st.floats(3.0, 8.0),
    across=st.floats(-0.6, 0.6),
    height=st.floats(-0.6, 0.6),
)
def test_rendered_object_projects_where_the_camera_maths_says(position, yaw, pitch, depth, across, height):
    """Place a small sphere at a known point of the view, check project() and the render agree."""
    camera = torch.tensor([*position, yaw, pitch], dtype=torch.float64)
    forward, right, up = camera_axes(camera)
    half = depth * focal_scale()
    centre = camera[:3] + depth * forward + across * half * right + height * half * up
    row, col, got_depth = project(centre, camera, 64)
    # project() inverts the construction.
    assert float(got_depth) == pytest.approx(depth, rel=1e-9)
    assert float(col) == pytest.approx((across + 1) * 32, abs=1e-6)
    assert float(row) == pytest.approx((1 - height) * 32, abs=1e-6)
    # The render puts the sphere there: its pixels' centroid within a pixel, its centre pixel covered.
    radius = 0.04 * depth
    image = render_one(Scene((Sphere(tuple(centre.tolist()), radius, WHITE),), light=(0.0, 0.0, 1.0)), camera.tolist())
    mask = mask_of(image)
    rows, cols = np.nonzero(mask)
    assert len(rows) > 0
    assert abs(rows.mean() + 0.5 - float(row)) < 0.75
    assert abs(cols.mean() + 0.5 - float(col)) < 0.75
    assert mask[int(row), int(col)]
    # Apparent radius: r / depth / tan(fov / 2) * 32 pixels, up to perspective and pixelisation.
    expected_area = math.pi * (radius / depth / focal_scale(FOV_DEGREES) * 32) ** 2
    assert 0.6 * expected_area < mask.sum() < 1.6 * expected_area + 4


def test_look_at_centres_the_target():
    position = torch.tensor([[3.0, -2.0, 1.5], [0.5, 4.0, -1.0]], dtype=torch.float64)
    target = torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)
    row, col, depth = project(target.expand(2, 3), look_at(position, target), 64)
    assert torch.allclose(row, torch.full((2,), 32.0, dtype=torch.float64))
    assert torch.allclose(col, torch.full((2,), 32.0, dtype=torch.float64))
    assert (depth > 0).all()


def test_lambertian_shading_of_each_shape():
    light = (-0.6, 0.0, 0.8)  # unit
    front = (-5.0, 0.0, 0.5, 0.0, 0.0)  # looking along +x at height 0.5
    # Box face x = -0.5 and the cylinder's side both face (-1, 0, 0) at the centre pixel.
    box = render_one(Scene((Box((0.0, 0.0, 0.5), (0.5, 0.5, 0.5), 0.0, WHITE),), light), front)
    np.testing.assert_allclose(box[32, 32], lit(WHITE, 0.6), atol=1)
    cylinder = render_one(Scene((Cylinder((0.0, 0.0, 0.0), 0.5, 1.0, WHITE),), light), front)
    np.testing.assert_allclose(cylinder[32, 32], lit(WHITE, 0.6), atol=1.5)
    # A box turned by 30 degrees: the face seen has normal (-cos 30, -sin 30, 0).
    turned = render_one(
        Scene((Box((0.0, 0.0, 0.5), (0.5, 0.5, 0.5), math.radians(30), WHITE),), light),
        (-5.0, -1.0, 0.5, math.atan2(1.0, 5.0), 0.0),
    )
    np.testing.assert_allclose(turned[32, 32], lit(WHITE, 0.6 * math.cos(math.radians(30))), atol=1)
    # From straight above: the cylinder's top cap, normal +z.
    above = (0.0, 0.0, 5.0, 0.0, -math.pi / 2 + 1e-4)
    top = render_one(Scene((Cylinder((0.0, 0.0, 0.0), 0.5, 1.0, WHITE),), light), above)
    np.testing.assert_allclose(top[32, 32], lit(WHITE, 0.8), atol=1)
    # A sphere: the normal where pixel (32, 32)'s ray (through its centre, half a pixel off the
    # image centre) meets it.
    sphere = render_one(Scene((Sphere((0.0, 0.0, 0.5), 0.5, WHITE),), light), front)
    a, b, c = pixel_rays(64).double()[:, 32 * 64 + 32]
    forward, right, up = camera_axes(torch.tensor(front, dtype=torch.float64))
    d = a * forward + b * right + c * up
    oc = torch.tensor(front[:3], dtype=torch.float64) - torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    t = -(oc @ d) - torch.sqrt((oc @ d) ** 2 - (oc @ oc - 0.25))
    normal = (oc + t * d) / 0.5
    np.testing.assert_allclose(sphere[32, 32], lit(WHITE, float(normal @ torch.tensor(light).double())), atol=1)
    # The background is not shaded.
    assert (box[0, 0] == 0).all()


def test_room_floor_walls_and_shadow():
    floor, wall = (0.8, 0.6, 0.4), (0.3, 0.5, 0.9)
    light = (math.sqrt(0.5), 0.0, math.sqrt(0.5))
    room = Room(4.0, floor, wall)
    empty = Scene((), light, room=room)
    down = render_one(empty, (0.0, 0.0, 2.0, 0.0, -math.pi / 2 + 1e-4))
    np.testing.assert_allclose(down[32, 32], lit(floor, light[2]), atol=1)
    # Looking along +x at the wall x = 4, whose normal (-1, 0, 0) faces away from the light.
    ahead = render_one(empty, (0.0, 0.0, 1.0, 0.0, 0.0))
    np.testing.assert_allclose(ahead[32, 32], lit(wall, -light[0]), atol=1)
    # Looking along -x: the wall x = -4 faces the light.
    back = render_one(empty, (0.0, 0.0, 1.0, math.pi, 0.0))
    np.testing.assert_allclose(back[32, 32], lit(wall, light[0]), atol=1)
    # A sphere resting at the origin shadows the floor at (-0.5, 0, 0); (-0.5, 2, 0) is lit.
    scene = Scene((Sphere((0.0, 0.0, 0.5), 0.5, WHITE),), light, room=room)
    camera = look_at(
        torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64), torch.tensor([-0.5, 1.0, 0.0], dtype=torch.float64)
    )
    image = render_one(scene, camera.tolist())
    for point, expected in (((-0.5, 0.0, 0.0), lit(floor, 0.0)), ((-0.5, 2.0, 0.0), lit(floor, light[2]))):
        row, col, _ = project(torch.tensor(point, dtype=torch.float64), camera, 64)
        np.testing.assert_allclose(image[int(row), int(col)], expected, atol=1)


def test_render_checks_its_inputs():
    scene = Scene((), (0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="cameras"):
        render([scene], torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="scenes in dim 0"):
        render([scene, scene], torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="Sphere, Box or Cylinder"):
        render([Scene(("cone",), (0.0, 0.0, 1.0))], torch.zeros(1, 1, 5))


def test_scenes_are_deterministic_and_independent_of_chunking():
    images, cameras = render_scenes("rooms", 3, "train", 0, 4)
    again, cameras_again = render_scenes("rooms", 3, "train", 2, 4)
    np.testing.assert_array_equal(images[2:], again)
    np.testing.assert_array_equal(cameras[2:], cameras_again)
    other_seed, _ = render_scenes("rooms", 4, "train", 0, 1)
    test_split, _ = render_scenes("rooms", 3, "test", 0, 1)
    assert (other_seed != images[:1]).any() and (test_split != images[:1]).any()
    assert images.dtype == np.uint8 and images.shape == (4, 10, 64, 64, 3)
    assert cameras.dtype == np.float32 and cameras.shape == (4, 10, 5)


def test_rooms_family():
    scenes, cameras = sample_scenes("rooms", 0, "train", 0, 60)
    assert get_family("rooms").num_views == 10
    counts = [len(s.shapes) for s in scenes]
    assert set(counts) == {1, 2, 3}
    kinds = {type(shape) for s in scenes for shape in s.shapes}
    assert kinds == {Sphere, Box, Cylinder}
    cams = torch.from_numpy(cameras).double()
    # On the ring at a fixed height, looking at the centre of the floor.
    np.testing.assert_allclose(cams[..., :2].norm(dim=-1), RING_RADIUS, rtol=1e-5)
    np.testing.assert_allclose(cams[..., 2], RING_HEIGHT, rtol=1e-6)
    row, col, _ = project(torch.zeros(cams.shape[:2] + (3,), dtype=torch.float64), cams, 64)
    np.testing.assert_allclose(row, 32, atol=1e-3)
    np.testing.assert_allclose(col, 32, atol=1e-3)
    # Every object lies inside the room and well inside the camera ring.
    for s in scenes:
        for shape in s.shapes:
            x, y = (shape.base if isinstance(shape, Cylinder) else shape.centre)[:2]
            assert math.hypot(x, y) < RING_RADIUS - 0.5


@pytest.mark.parametrize("family, parts", [("shepard_metzler", 5), ("shepard_metzler_7", 7)])
def test_shepard_metzler_family(family, parts):
    scenes, cameras = sample_scenes(family, 0, "train", 0, 24)
    assert get_family(family).num_views == 15
    for s in scenes:
        cells = np.array([b.centre for b in s.shapes])
        assert len(s.shapes) == parts and s.room is None
        assert all(b.half_size == (0.5, 0.5, 0.5) and b.yaw == 0.0 for b in s.shapes)
        assert len({tuple(np.round(c, 6)) for c in cells}) == parts  # no two cubes in one cell
        np.testing.assert_allclose(np.diff(cells, axis=0).__abs__().sum(1), 1.0, atol=1e-9)  # a face-to-face chain
        np.testing.assert_allclose(cells.mean(0), 0.0, atol=1e-9)
        assert len({b.colour for b in s.shapes}) == parts
    distance = np.linalg.norm(cameras[..., :3], axis=-1)
    np.testing.assert_allclose(distance, distance.flat[0], rtol=1e-5)  # a fixed distance
    images, _ = render_scenes(family, 0, "train", 0, 8)
    background = np.round(np.asarray(SM_BACKGROUND) * 255).astype(np.uint8)
    shape_pixels = np.any(images != background, axis=-1)
    assert (shape_pixels.sum(axis=(2, 3)) > 150).all()  # the shape is seen in every view
    border = np.concatenate(
        [shape_pixels[..., 0, :], shape_pixels[..., -1, :], shape_pixels[..., :, 0], shape_pixels[..., :, -1]], axis=-1
    )
    assert not border.any()  # ... and whole
