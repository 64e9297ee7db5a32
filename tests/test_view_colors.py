"""Texture colours projected from the views (nova3d.fusion.view_colors): a mesh with known
colours is rendered on an orbit, and projecting those renders back must give its colours where
the views see it, nothing where they do not, and leave out what the conflict maps flag."""
import numpy as np
import pytest
import torch
import trimesh

from nova3d.cameras import OrbitSpec, orbit_cameras
from nova3d.eval.mesh_render import render_mesh
from nova3d.fusion.view_colors import ViewColorConfig, ViewProjector, projected_color_fn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RES = 64


def painted_box() -> trimesh.Trimesh:
    """A box, subdivided so that the vertex colours can follow x: red on the left half, blue on the right."""
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    for _ in range(3):
        box = box.subdivide()
    rgb = np.where(box.vertices[:, :1] < 0, [[230, 20, 20]], [[20, 20, 230]]).astype(np.uint8)
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1))
    return box


@pytest.fixture(scope="module")
def scene():
    box = painted_box()
    cams = orbit_cameras(OrbitSpec(num_views=8, resolution=RES, elevation_deg=20.0, radius=1.8))
    views = render_mesh(box, cams, image_size=RES).rgb
    return box, cams, views


def surface_points(box: trimesh.Trimesh, face_normal, edge_gap: float = 0.08, seam_gap: float = 0.1):
    """Triangle centres on the box face with outward normal `face_normal`, away from its edges
    (silhouettes, where a pixel is part background) and from the colour seam at x = 0."""
    normal = np.asarray(face_normal, dtype=float)
    pts = box.triangles_center[np.abs(box.face_normals - normal).max(1) < 1e-6]
    across = np.abs(pts[:, normal == 0])  # the two coordinates that vary over the face
    keep = (across < 0.3 - edge_gap).all(1) & ((np.abs(pts[:, 0]) > seam_gap) | (normal[0] != 0))
    pts = pts[keep]
    assert len(pts) > 4
    return torch.tensor(pts, dtype=torch.float32), torch.tensor(np.tile(normal, (len(pts), 1)), dtype=torch.float32)


def true_colors(points: torch.Tensor) -> torch.Tensor:
    red, blue = torch.tensor([230, 20, 20]) / 255, torch.tensor([20, 20, 230]) / 255
    return torch.where(points[:, :1] < 0, red, blue)


def test_projection_recovers_the_colours_the_views_show(scene):
    box, cams, views = scene
    projector = ViewProjector(box, views, cams)
    for normal in ((0, -1, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)):  # front, back, side, top: all seen at 20 deg
        pts, nrm = surface_points(box, normal)
        rgb, weight = projector.colors(pts, nrm)
        assert (weight > 0).all(), normal
        assert (rgb - true_colors(pts)).abs().max() < 0.05, normal


def test_hidden_and_back_facing_points_get_no_weight(scene):
    box, cams, views = scene
    projector = ViewProjector(box, views, cams)
    bottom, down = surface_points(box, (0, 0, -1))  # every camera is above the box's bottom face
    assert (projector.colors(bottom, down)[1] == 0).all()
    # A point inside the box, given an outward normal: the box's own surface hides it from every view.
    inner = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, -1.0, 0.0]])
    assert projector.colors(*inner)[1].item() == 0


def test_conflict_maps_keep_flagged_pixels_out_of_the_texture(scene):
    box, cams, views = scene
    painted = views.clone()
    painted[3] = torch.tensor([0.1, 0.9, 0.1])[:, None, None]  # view 3 disagrees everywhere: green
    pts, nrm = surface_points(box, (0, 1, 0))  # the back face: view 3 (135 deg) sees it
    naive, _ = ViewProjector(box, painted, cams).colors(pts, nrm)
    assert (naive - true_colors(pts)).abs().max() > 0.1  # the green leaks in without conflict maps
    conflict = torch.zeros(8, RES // 2, RES // 2)
    conflict[3] = 1.0  # conflict maps at another resolution than the views: sampled, not indexed
    trusted, weight = ViewProjector(box, painted, cams, conflict).colors(pts, nrm)
    assert (weight > 0).all()
    assert (trusted - true_colors(pts)).abs().max() < 0.05


def test_field_colour_fills_what_no_view_sees(scene):
    box, cams, views = scene
    grey = torch.tensor([0.5, 0.5, 0.5])
    color_fn = projected_color_fn(ViewProjector(box, views, cams), lambda p, n: grey.expand(len(p), 3))
    bottom, down = surface_points(box, (0, 0, -1))
    front, toward = surface_points(box, (0, -1, 0))
    assert torch.allclose(color_fn(bottom, down), grey.expand(len(bottom), 3))
    assert (color_fn(front, toward) - true_colors(front)).abs().max() < 0.05


def test_sharper_weighting_favours_the_view_facing_the_surface(scene):
    box, cams, views = scene
    painted = views.clone()
    painted[1] = torch.tensor([0.1, 0.9, 0.1])[:, None, None]  # view 1 (45 deg) sees the front obliquely
    pts, nrm = surface_points(box, (0, -1, 0))
    soft = ViewProjector(box, painted, cams, cfg=ViewColorConfig(power=0.0)).colors(pts, nrm)[0]
    sharp = ViewProjector(box, painted, cams, cfg=ViewColorConfig(power=8.0)).colors(pts, nrm)[0]
    err = lambda rgb: (rgb - true_colors(pts)).abs().mean()  # noqa: E731
    assert err(sharp) < err(soft)
