"""nova3d.cameras on its own (pure tensors); agreement with Blender is in test_cameras_blender.py."""
from __future__ import annotations

import math

import pytest
import torch

from nova3d.cameras import (Cameras, OrbitSpec, convert_c2w, convert_normal_frame, decode_normals,
                            encode_normals, intrinsics, look_at_c2w, orbit_azimuths, orbit_cameras,
                            orbit_positions, pixel_rays, project_points, scale_intrinsics, world_to_camera)


def _close(a: torch.Tensor, b, atol: float = 1e-5) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol)


def test_orbit_positions_follow_the_documented_convention() -> None:
    az = torch.tensor([0.0, 90.0, 180.0, 270.0, 0.0])
    el = torch.tensor([0.0, 0.0, 0.0, 0.0, 90.0])
    pos = orbit_positions(az, el, 2.0)
    # Azimuth 0 is the front (camera on -Y), 90 is +X (counter-clockwise from above), +Z is up.
    assert _close(pos, [[0, -2, 0], [2, 0, 0], [0, 2, 0], [-2, 0, 0], [0, 0, 2]])
    assert _close(orbit_azimuths(4, 10.0), [10, 100, 190, 280])


def test_orbit_cameras_look_at_the_origin_with_z_up() -> None:
    cams = orbit_cameras(OrbitSpec(num_views=16, elevation_deg=20.0, radius=1.5, resolution=64))
    assert len(cams) == 16 and cams.c2w.shape == (16, 4, 4) and cams.K.shape == (16, 3, 3)
    centres = cams.c2w[:, :3, 3]
    assert _close(centres.norm(dim=-1), torch.full((16,), 1.5))
    forward = -cams.c2w[:, :3, 2]  # opengl cameras look down -z
    assert _close(forward, torch.nn.functional.normalize(-centres, dim=-1))
    assert (cams.c2w[:, 2, 1] > 0).all()  # camera up has a positive world-Z component
    assert _close(cams.c2w[:, :3, 0][:, 2], torch.zeros(16))  # camera right stays horizontal
    # View 0 at elevation 0: right = +X, up = +Z, camera on -Y with its back (+z) towards -Y.
    front = orbit_cameras(OrbitSpec(num_views=4))
    assert _close(front.c2w[0], [[1, 0, 0, 0], [0, 0, -1, -1.5], [0, 1, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("eye", [[0.3, -1.2, 0.4], [2.0, 1.0, -1.0], [0.0, 0.0, 3.0], [0.0, 0.0, -2.0]])
def test_look_at_is_orthonormal_and_right_handed(eye: list[float]) -> None:
    c2w = look_at_c2w(torch.tensor([eye]))[0]  # includes straight down/up (degenerate up vector)
    R = c2w[:3, :3]
    assert _close(R.T @ R, torch.eye(3))
    assert math.isclose(float(torch.linalg.det(R)), 1.0, abs_tol=1e-5)
    assert _close(-R[:, 2], torch.nn.functional.normalize(-torch.tensor(eye), dim=0))
    assert _close(c2w[3], [0, 0, 0, 1])


def test_intrinsics_fov_spans_the_larger_side() -> None:
    K = intrinsics(60.0, 200, 100)
    assert _close(K[:2, 2], [100, 50])  # principal point at the image centre (pixel-edge origin)
    # A point at half the field of view (horizontally) lands on the image border.
    c2w = look_at_c2w(torch.tensor([[0.0, -1.0, 0.0]]))
    point = torch.tensor([[math.tan(math.radians(30.0)), 0.0, 0.0]])
    pix, depth = project_points(point, c2w, K[None])
    assert _close(pix[0, 0], [200, 50], atol=1e-3) and _close(depth, [[1.0]])
    assert _close(scale_intrinsics(K, 0.5)[:2], K[:2] * 0.5)


def test_project_points_and_pixel_rays_agree() -> None:
    cams = orbit_cameras(OrbitSpec(num_views=3, elevation_deg=(10.0, -30.0, 45.0), resolution=24,
                                   start_azimuth_deg=33.0))
    assert _close(project_points(torch.zeros(1, 3), cams.c2w, cams.K)[0], torch.full((3, 1, 2), 12.0), 1e-4)
    origins, dirs = pixel_rays(cams.c2w, cams.K, 24, 24)
    assert _close(dirs.norm(dim=-1), torch.ones(3, 24, 24))
    t = torch.linspace(0.5, 3.0, 24 * 24).reshape(1, 24, 24, 1)
    points = origins + t * dirs  # a point on every pixel's ray
    for v in range(3):
        pix, depth = project_points(points[v].reshape(-1, 3), cams.c2w[v:v + 1], cams.K[v:v + 1])
        j, i = torch.meshgrid(torch.arange(24.0) + 0.5, torch.arange(24.0) + 0.5, indexing="ij")
        assert _close(pix[0], torch.stack([i, j], -1).reshape(-1, 2), 1e-3)  # lands on the pixel centre
        forward = -cams.c2w[v, :3, 2]
        assert _close(depth[0], (t[0] * (dirs[v] @ forward)[..., None]).reshape(-1), 1e-4)


def test_convert_c2w_round_trip_and_world_to_camera() -> None:
    c2w = orbit_cameras(OrbitSpec(num_views=5, elevation_deg=25.0)).c2w
    cv = convert_c2w(c2w, "opengl", "opencv")
    assert _close(convert_c2w(cv, "opencv", "opengl"), c2w)
    assert _close(convert_c2w(c2w, "opengl", "blender"), c2w)  # Blender camera axes are opengl's
    assert _close(cv[:, :3, 2], -c2w[:, :3, 2]) and _close(cv[:, :3, 1], -c2w[:, :3, 1])
    assert _close(world_to_camera(c2w) @ c2w, torch.eye(4).expand(5, 4, 4))
    with pytest.raises(ValueError, match="unknown camera convention"):
        convert_c2w(c2w, "opengl", "colmap")


def test_normal_frames_round_trip() -> None:
    cams = orbit_cameras(OrbitSpec(num_views=6, elevation_deg=15.0, start_azimuth_deg=40.0))
    n = torch.nn.functional.normalize(torch.randn(6, 5, 7, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    for a, b in [("world", "view"), ("world", "input_view"), ("view", "input_view")]:
        there = convert_normal_frame(n, cams.c2w, a, b)
        assert _close(convert_normal_frame(there, cams.c2w, b, a), n)
        assert _close(there.norm(dim=-1), torch.ones(6, 5, 7))
    # A surface facing its camera is +z in that view's frame.
    facing = cams.c2w[:, None, :3, 2]  # world direction towards each camera
    assert _close(convert_normal_frame(facing, cams.c2w, "world", "view"), torch.tensor([0.0, 0, 1]).expand(6, 1, 3))
    # The input view's frame is view `input_view`'s own frame, for every view's map.
    to_input = convert_normal_frame(n, cams.c2w, "world", "input_view", input_view=2)
    assert _close(to_input, convert_normal_frame(n, cams.c2w[2:3].expand(6, 4, 4), "world", "view"))
    assert _close(convert_normal_frame(n[:1], cams.c2w[:1], "view", "input_view"), n[:1])
    with pytest.raises(ValueError, match="unknown normal frame"):
        convert_normal_frame(n, cams.c2w, "world", "camera")


def test_encode_decode_normals() -> None:
    n = torch.nn.functional.normalize(torch.randn(100, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    enc = encode_normals(n)
    assert enc.min() >= 0 and enc.max() <= 1
    assert _close(decode_normals(enc), n)
    quantised = torch.round(enc * 65535) / 65535  # as stored in 16-bit PNGs
    assert (decode_normals(quantised) - n).abs().max() < 1e-4
    assert _close(decode_normals(torch.full((1, 3), 0.5)), torch.zeros(1, 3))  # background stays zero


def test_cameras_json_round_trip(tmp_path) -> None:
    cams = orbit_cameras(OrbitSpec(num_views=4, elevation_deg=(0.0, 10.0, 20.0, 30.0), resolution=32))
    cams.extra = {"object_id": "x"}
    cams.save(tmp_path / "cameras.json")
    back = Cameras.load(tmp_path / "cameras.json")
    assert _close(back.c2w, cams.c2w) and _close(back.K, cams.K) and back.extra == {"object_id": "x"}
    rolled = cams.roll(1)
    assert _close(rolled.c2w[0], cams.c2w[1]) and _close(rolled.elevation_deg, [10, 20, 30, 0])
