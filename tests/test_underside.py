"""nova3d.fusion.underside: what hangs below the lowest point the views see is cut away. A box
with a shallow pyramid under it stands for the fit's visual-hull cone under a flat bottom."""
import numpy as np
import pytest
import torch

from nova3d.cameras import OrbitSpec, orbit_cameras
from nova3d.eval.mesh_render import render_mesh
from nova3d.fusion.mesh import MeshExportConfig, clean_mesh, extract_mesh
from nova3d.fusion.underside import cut_below, cut_unseen, cut_unseen_underside, lowest_seen_height

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BOUND, RES, IMAGE = 0.75, 96, 96
# Box [-0.3, 0.3]^3; its cone slopes 10 deg, less than the 11-14 deg at which elevation-0 cameras
# at radius 1.5 look down at it, so they never see it (as with the fit's visual-hull cone).
HALF, BOTTOM, APEX = 0.3, -0.3, -0.3 - 0.3 * np.tan(np.radians(10.0))


def box_with_cone(points: torch.Tensor) -> torch.Tensor:
    """A convex polytope as the max of its planes' signed distances: zero on its surface."""
    x, y, z = points.unbind(-1)
    sides = torch.stack([x.abs(), y.abs()], -1).max(-1).values - HALF
    top = z - HALF
    slope = (BOTTOM - APEX) / HALF  # the cone's four faces: z = APEX + slope * max(|x|, |y|)
    cone = (APEX + slope * torch.stack([x.abs(), y.abs()], -1).max(-1).values - z) / np.hypot(1, slope)
    return torch.stack([sides, top, cone], -1).max(-1).values


def sphere(points: torch.Tensor) -> torch.Tensor:
    return points.norm(dim=-1) - 0.3


def cameras(elevation: float):
    return orbit_cameras(OrbitSpec(num_views=8, resolution=IMAGE, elevation_deg=elevation, radius=1.5))


def masks(mesh, cams):
    """The views' masks: the cone hides behind the box, so these are the box's silhouettes."""
    return render_mesh(mesh, cams, image_size=IMAGE).mask[:, 0]


@pytest.fixture(scope="module")
def hull_mesh():
    return clean_mesh(extract_mesh(box_with_cone, BOUND, RES, progress=False))


def test_lowest_seen_point_is_the_flat_bottoms_edge_not_the_cone(hull_mesh):
    assert hull_mesh.vertices[:, 2].min() < APEX + 0.02
    cams = cameras(0.0)
    height = lowest_seen_height(hull_mesh, cams, masks(hull_mesh, cams))
    cell = 2 * BOUND / (RES - 1)
    assert BOTTOM - 2 * cell < height < BOTTOM + cell


def test_cut_below_is_the_half_space_intersection():
    pts = torch.tensor([[0.0, 0.0, -0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 0.25]])
    cut = cut_below(sphere, -0.1)(pts)
    assert torch.allclose(cut, torch.tensor([0.15, -0.1, -0.05]))  # below: distance to the plane wins


def test_export_cuts_the_cone_and_keeps_the_rest(hull_mesh):
    cfg = MeshExportConfig(resolution=RES)
    cams = cameras(0.0)
    mesh, height = cut_unseen_underside(hull_mesh, box_with_cone, BOUND, cams, masks(hull_mesh, cams), cfg)
    assert height is not None
    cell = 2 * BOUND / (RES - 1)
    assert mesh.vertices[:, 2].min() > height - 1e-3 and mesh.vertices[:, 2].min() < BOTTOM + 2 * cell
    assert np.isclose(mesh.vertices[:, 2].max(), hull_mesh.vertices[:, 2].max(), atol=1e-6)  # the top is untouched
    assert mesh.is_watertight


def test_nothing_is_cut_when_views_from_below_see_the_underside(hull_mesh):
    cfg = MeshExportConfig(resolution=RES)
    cams = cameras(-40.0)
    mesh, height = cut_unseen_underside(hull_mesh, box_with_cone, BOUND, cams, masks(hull_mesh, cams), cfg)
    assert height is None and mesh is hull_mesh


def cone_on_top(points: torch.Tensor) -> torch.Tensor:
    """The same polytope upside down: a dome over a flat top that elevation-0 cameras look up at."""
    return box_with_cone(points * torch.tensor([1.0, 1.0, -1.0]))


def test_top_cut_takes_the_unseen_dome_by_default_and_only_when_on():
    mesh = clean_mesh(extract_mesh(cone_on_top, BOUND, RES, progress=False))
    cams = cameras(0.0)
    cell = 2 * BOUND / (RES - 1)
    off = MeshExportConfig(resolution=RES, cut_unseen_underside=False, cut_unseen_top=False)
    kept, low, high = cut_unseen(mesh, cone_on_top, BOUND, cams, masks(mesh, cams), off)
    assert kept is mesh and low is None and high is None  # switched off: the top is left alone
    cfg = MeshExportConfig(resolution=RES)  # the default cuts it
    cut, low, high = cut_unseen(mesh, cone_on_top, BOUND, cams, masks(mesh, cams), cfg)
    assert mesh.vertices[:, 2].max() > -APEX - 0.02 and high is not None and low is None
    assert -BOTTOM - cell < cut.vertices[:, 2].max() < -BOTTOM + 2 * cell  # the flat top is back
    assert np.isclose(cut.vertices[:, 2].min(), mesh.vertices[:, 2].min(), atol=1e-6) and cut.is_watertight
