"""Evaluation metrics against known answers: CD, F-score, Volume IoU, normalisation/ICP,
mesh rendering, PSNR/SSIM/LPIPS. Fast CPU tests; the nvdiffrast one is marked `gpu`."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import trimesh

from nova3d.cameras import OrbitSpec, orbit_cameras
from nova3d.eval import appearance, geometry, normalize
from nova3d.eval.mesh_render import MeshData, as_mesh_data, render_mesh


def sphere(radius: float) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=4, radius=radius)


def lumpy() -> trimesh.Trimesh:
    """An asymmetric closed object (a box with a smaller box sticking out of one corner),
    so that ICP has a unique answer."""
    body = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    knob = trimesh.creation.box(extents=(0.2, 0.15, 0.25))
    knob.apply_translation((0.25, 0.15, 0.2))
    return trimesh.util.concatenate([body, knob])


def rotation(axis, degrees: float) -> np.ndarray:
    return trimesh.transformations.rotation_matrix(math.radians(degrees), axis)[:3, :3]


# ---------------------------------------------------------------- Chamfer / F-score

def test_chamfer_sphere_vs_scaled_sphere():
    r1, r2 = 0.3, 0.4
    res = geometry.chamfer_surface(sphere(r1), sphere(r2), num_points=20_000, seed=0)
    # NN distance between concentric spheres is |r1 - r2|; lateral sample spacing (~0.005)
    # and the icosphere's flat faces add well under 1e-3.
    assert res.chamfer == pytest.approx(abs(r1 - r2), abs=1e-3)
    assert res.accuracy == pytest.approx(0.1, abs=1e-3) and res.completeness == pytest.approx(0.1, abs=1e-3)
    assert res.fscore == 0.0 and res.precision == 0.0  # every distance (~0.1) > threshold 0.05
    assert geometry.chamfer_surface(sphere(r1), sphere(r2), num_points=5000, threshold=0.15).fscore == 1.0
    assert res.sampling == "surface" and res.num_points_pred == 20_000 and res.nn_backend == "scipy.cKDTree"


def test_mesh_against_itself_is_perfect():
    mesh = trimesh.creation.torus(major_radius=0.3, minor_radius=0.1, major_sections=48, minor_sections=24)
    cd = geometry.chamfer_surface(mesh, mesh, num_points=10_000)
    iou = geometry.volume_iou(mesh, mesh)
    assert cd.chamfer == 0.0 and cd.fscore == 1.0 and cd.precision == 1.0 and cd.recall == 1.0
    assert iou.iou == 1.0 and iou.method == geometry.IOU_METHOD


def test_chamfer_agrees_with_pytorch3d():
    from pytorch3d.loss import chamfer_distance
    from pytorch3d.ops import knn_points

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3000, 3, generator=gen), torch.rand(2500, 3, generator=gen) * 0.8 + 0.1
    ours = geometry.point_metrics(x, y)
    # Same points, pytorch3d's knn (squared distances): take the root, then the two means.
    d_xy = knn_points(x[None], y[None], K=1).dists[0, :, 0].sqrt()
    d_yx = knn_points(y[None], x[None], K=1).dists[0, :, 0].sqrt()
    assert ours.chamfer == pytest.approx(0.5 * float(d_xy.mean() + d_yx.mean()), rel=1e-5)
    # pytorch3d's chamfer_distance is the SUM of the two mean SQUARED distances.
    p3d, _ = chamfer_distance(x[None], y[None], point_reduction="mean")
    sq = geometry.nearest_distances(x, y).pow(2).mean() + geometry.nearest_distances(y, x).pow(2).mean()
    assert float(p3d) == pytest.approx(float(sq), rel=1e-4)


def test_sample_surface_is_area_weighted_and_seeded():
    mesh = as_mesh_data(trimesh.creation.box(extents=(1.0, 0.5, 0.25)))
    a = geometry.sample_surface(mesh.verts, mesh.faces, 40_000, seed=3)
    assert torch.equal(a, geometry.sample_surface(mesh.verts, mesh.faces, 40_000, seed=3))
    # Share of points on the two largest (+-z, area 0.5 each of total 1.75) faces.
    on_z = (a[:, 2].abs() > 0.125 - 1e-6).float().mean()
    assert float(on_z) == pytest.approx(1.0 / 1.75, abs=0.01)


# ---------------------------------------------------------------- depth-rendered points

def test_depth_points_lie_on_surface_and_depth_chamfer():
    cams = orbit_cameras(OrbitSpec(num_views=4, resolution=64, elevation_deg=20.0))
    out = render_mesh(sphere(0.3), cams, image_size=64)
    pts = geometry.depth_to_points(out.depth, cams, out.mask)
    assert len(pts) > 1000
    assert pts.norm(dim=-1).sub(0.3).abs().max() < 2e-3  # back-projection lands on the sphere
    same = geometry.chamfer_depth(sphere(0.3), sphere(0.3), cams, image_size=64)
    assert same.chamfer == 0.0 and same.sampling == "depth" and same.voxel_size == 0.01
    apart = geometry.chamfer_depth(sphere(0.3), sphere(0.4), cams, image_size=64)
    assert apart.chamfer == pytest.approx(0.1, abs=5e-3)


def test_voxel_downsample_averages_per_voxel():
    pts = torch.tensor([[0.0, 0, 0], [0.002, 0, 0], [0.5, 0.5, 0.5], [0.504, 0.5, 0.5]])
    out = geometry.voxel_downsample(pts, 0.01)
    assert out.shape == (2, 3)
    assert sorted(out[:, 0].tolist()) == pytest.approx([0.001, 0.502])


# ---------------------------------------------------------------- volume IoU

@pytest.mark.parametrize("grid", ["union_bbox", "unit_box"])
def test_iou_sphere_vs_scaled_sphere(grid):
    r1, r2 = 0.3, 0.4
    res = geometry.volume_iou(sphere(r1), sphere(r2), resolution=64, grid=grid)
    assert res.iou == pytest.approx((r1 / r2) ** 3, abs=0.01)  # 64^3 voxel tolerance
    assert res.resolution == 64 and res.grid == grid


def test_occupancy_of_a_torus_matches_its_volume():
    # Non-convex with a through-hole: parity along rays must count 4 crossings correctly.
    mesh = as_mesh_data(trimesh.creation.torus(major_radius=0.3, minor_radius=0.12,
                                               major_sections=64, minor_sections=32))
    occ = geometry.occupancy_grid(mesh.verts, mesh.faces, torch.full((3,), -0.5), 1.0, 64)
    volume = float(occ.sum()) / 64**3
    assert volume == pytest.approx(2 * math.pi**2 * 0.3 * 0.12**2, rel=0.03)


@pytest.mark.parametrize("open_sides", [["+z"], ["-x"], ["+y"], ["+z", "-z"]])
def test_iou_of_non_watertight_box_matches_closed_box(open_sides):
    box = trimesh.creation.box(extents=(0.8, 0.6, 0.5))
    axes = {"x": 0, "y": 1, "z": 2}
    drop = np.zeros(len(box.faces), dtype=bool)
    for side in open_sides:  # remove both triangles of that side
        drop |= box.face_normals[:, axes[side[1]]] * (1 if side[0] == "+" else -1) > 0.99
    holed = trimesh.Trimesh(box.vertices, box.faces[~drop], process=False)
    assert drop.sum() == 2 * len(open_sides) and not holed.is_watertight
    assert geometry.volume_iou(holed, box).iou > 0.99


# ---------------------------------------------------------------- normalisation / ICP

def test_unit_box_normalisation_removes_translation_and_scale():
    gt = lumpy()
    pred = gt.copy()
    pred.apply_scale(2.5)
    pred.apply_translation((0.3, -0.7, 0.2))
    p, g, record = normalize.align_pair(pred, gt, mode="unit_box")
    assert geometry.chamfer_surface(p, g, num_points=5000).chamfer < 1e-5
    assert geometry.volume_iou(p, g).iou == pytest.approx(1.0, abs=1e-3)
    extent = np.ptp(p.verts.numpy(), axis=0)
    assert extent.max() == pytest.approx(1.0, abs=1e-6)
    assert record.mode == "unit_box" and record.icp is None
    assert record.pred_transform.scale == pytest.approx(record.gt_transform.scale / 2.5)
    json.dumps(record.to_json())
    # "keep" leaves the pair alone, so the difference stays measurable.
    p_keep, _, keep = normalize.align_pair(pred, gt, mode="keep")
    assert torch.equal(p_keep.verts, as_mesh_data(pred).verts) and keep.pred_transform.scale == 1.0
    assert geometry.chamfer_surface(p_keep, gt, num_points=5000).chamfer > 0.1


def test_icp_recovers_a_small_rotation():
    gt = lumpy()
    R = rotation([1.0, 2.0, 3.0], 6.0)
    pred = gt.copy()
    pred.vertices = pred.vertices @ R.T + np.array([0.02, -0.01, 0.015])
    p, g, record = normalize.align_pair(pred, gt, mode="keep", icp=True, icp_points=4000, icp_iterations=30)
    est = record.icp.transform.rotation.numpy()
    err = np.degrees(np.arccos(np.clip((np.trace(est @ R) - 1) / 2, -1, 1)))  # est should be R^T
    assert err < 0.5
    # Independent samples of the two surfaces leave a ~0.01 RMS floor even when aligned.
    assert record.icp.rmse_after < 0.6 * record.icp.rmse_before and record.icp.converged
    assert geometry.chamfer_surface(p, g, num_points=5000).chamfer < 0.005


# ---------------------------------------------------------------- rendering

@pytest.mark.parametrize("backend", ["torch", "pytorch3d"])
def test_render_unit_cube_silhouette_and_depth(backend):
    res, radius = 64, 2.5  # radius 1.5 would fill the whole image with the cube's front face
    cams = orbit_cameras(OrbitSpec(num_views=4, radius=radius, resolution=res))
    out = render_mesh(trimesh.creation.box(extents=(1, 1, 1)), cams, image_size=res, backend=backend)
    assert out.rgb.shape == (4, 3, res, res) and out.mask.shape == out.depth.shape == (4, 1, res, res)
    # Front face at distance radius - 0.5 spans +-0.5 -> +-f * 0.5 / (radius - 0.5) px around
    # the centre; pixels whose centre (i + 0.5) falls inside are covered.
    f = float(cams.K[0, 0, 0])
    lo, hi = res / 2 - f * 0.5 / (radius - 0.5), res / 2 + f * 0.5 / (radius - 0.5)
    covered = [i for i in range(res) if lo < i + 0.5 < hi]
    for v in range(4):
        m = out.mask[v, 0] > 0.5
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        assert rows.tolist() == covered and cols.tolist() == covered
        assert int(m.sum()) == len(covered) ** 2
        assert float(out.depth[v, 0, res // 2, res // 2]) == pytest.approx(radius - 0.5, abs=1e-4)
    assert torch.all(out.rgb[:, :, 0, 0] == 1.0) and torch.all(out.depth[:, :, 0, 0] == 0)


def test_supersampled_silhouette_area_approaches_analytic_area():
    res, radius = 64, 2.5
    cams = orbit_cameras(OrbitSpec(num_views=1, radius=radius, resolution=res))
    out = render_mesh(trimesh.creation.box(extents=(1, 1, 1)), cams, image_size=res, supersample=4)
    area = (2 * float(cams.K[0, 0, 0]) * 0.5 / (radius - 0.5)) ** 2  # px^2; 1296 px unfiltered
    assert float(out.mask.sum()) == pytest.approx(area, abs=20)  # 1/4-px quantisation on edges
    assert float(out.depth[0, 0, res // 2, res // 2]) == pytest.approx(radius - 0.5, abs=1e-4)
    with pytest.raises(ValueError):
        render_mesh(trimesh.creation.box(), cams, image_size=res, backend="opengl")


def test_render_colours_as_stored():
    cams = orbit_cameras(OrbitSpec(num_views=2, radius=2.5, resolution=32))
    box = trimesh.creation.box(extents=(1, 1, 1))
    box.visual.vertex_colors = np.tile([51, 102, 153, 255], (len(box.vertices), 1))
    out = render_mesh(box, cams, image_size=32, background=0.0)
    assert out.rgb[:, :, 16, 16] == pytest.approx(torch.tensor([0.2, 0.4, 0.6]).expand(2, 3), abs=1e-5)
    # A UV-textured square facing view 0 (camera on -Y): texture top-left red, top-right green,
    # bottom-left blue, bottom-right white; uv's v grows upwards (+Z).
    verts = torch.tensor([[-0.5, 0, -0.5], [0.5, 0, -0.5], [0.5, 0, 0.5], [-0.5, 0, 0.5]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tex = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[0, 0, 1], [1, 1, 1]]])
    quad = MeshData(verts, torch.tensor([[0, 1, 2], [0, 2, 3]]), uv=uv, texture=tex)
    img = render_mesh(quad, cams.select([0]), image_size=32).rgb[0]
    q = 6  # quadrant centres lie 6 px from the image centre (face spans ~ +-14 px)
    assert img[:, 16 - q, 16 - q] == pytest.approx(torch.tensor([1.0, 0, 0]), abs=0.05)
    assert img[:, 16 - q, 16 + q] == pytest.approx(torch.tensor([0.0, 1, 0]), abs=0.05)
    assert img[:, 16 + q, 16 - q] == pytest.approx(torch.tensor([0.0, 0, 1]), abs=0.05)


def _assert_renders_agree(a, b, depth_tol: float):
    ma, mb = a.mask > 0, b.mask > 0
    both = ma & mb
    assert float((ma != mb).float().sum() / both.sum()) < 0.005  # at most a few edge pixels
    assert float((a.depth - b.depth)[both].abs().median()) < 1e-4
    assert float((a.depth - b.depth)[both].abs().max()) < depth_tol
    assert float((a.rgb - b.rgb).permute(1, 0, 2, 3)[:, both[:, 0]].abs().mean()) < 1e-3


def _coloured_object() -> trimesh.Trimesh:
    mesh = trimesh.util.concatenate([lumpy(), sphere(0.2)])  # overlapping parts: depth test
    mesh.visual.vertex_colors = (np.abs(mesh.vertices) / 0.5 * 255).clip(0, 255).astype(np.uint8)
    return mesh


def test_torch_rasteriser_matches_pytorch3d():
    cams = orbit_cameras(OrbitSpec(num_views=2, resolution=64, elevation_deg=15.0))
    mesh = _coloured_object()
    a = render_mesh(mesh, cams, 64, backend="torch")
    b = render_mesh(mesh, cams, 64, backend="pytorch3d")
    # pytorch3d samples 1/1000 px off the pixel centre (mesh_render), so steep silhouette
    # slopes may differ slightly in depth.
    _assert_renders_agree(a, b, depth_tol=5e-3)


@pytest.mark.gpu
def test_nvdiffrast_matches_torch_rasteriser():
    cams = orbit_cameras(OrbitSpec(num_views=4, resolution=128, elevation_deg=15.0))
    mesh = _coloured_object()
    _assert_renders_agree(render_mesh(mesh, cams, 128, backend="torch"),
                          render_mesh(mesh, cams, 128, backend="nvdiffrast"), depth_tol=5e-3)


# ---------------------------------------------------------------- appearance

def test_psnr_ssim_known_pairs():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 64, 64, generator=gen) * 0.8 + 0.1
    same = appearance.appearance_metrics(img, img.clone(), lpips=None)
    # identical views: PSNR at the cap (100 dB = MSE 1e-10), never inf, and counted
    assert same.psnr == appearance.PSNR_MAX_DB == 100.0 and same.psnr_capped_views == 3
    assert same.ssim == pytest.approx(1.0, abs=1e-6)
    assert same.num_views == 3 and len(same.psnr_per_view) == 3 and same.image_size == (64, 64)
    uncapped = appearance.appearance_metrics(img, img.clone(), lpips=None, psnr_max_db=None)
    assert math.isinf(uncapped.psnr) and json.loads(json.dumps(uncapped.to_json()))["psnr"] == "inf"
    for delta in (0.01, 0.05):  # constant offset: MSE = delta^2 -> PSNR = -20 log10(delta)
        res = appearance.appearance_metrics(img, img + delta, lpips=None)
        assert res.psnr == pytest.approx(-20 * math.log10(delta), abs=1e-3)
    ssims = [appearance.appearance_metrics(img, (img + s * torch.randn(img.shape, generator=gen)).clamp(0, 1),
                                           lpips=None).ssim for s in (0.02, 0.1, 0.3)]
    assert 1 > ssims[0] > ssims[1] > ssims[2] > 0  # more noise, less structure


def test_composite_on_white():
    rgb, alpha = torch.zeros(1, 3, 2, 2), torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    out = appearance.composite(rgb, alpha)
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, :, 0, 1].tolist() == [1, 1, 1]
    assert out[0, 0, 1, 0] == 0.5


def test_lpips_unavailable_without_cached_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fn, reason = appearance.load_lpips()
    assert fn is None and str(tmp_path) in reason
    img = torch.full((2, 3, 32, 32), 0.5)
    res = appearance.appearance_metrics(img, img)
    assert res.lpips is None and res.lpips_per_view is None and "not in the torch hub cache" in res.lpips_unavailable_reason
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded (or attempted into the cache)


def test_lpips_callable_is_used_per_view():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 3, 16, 16, generator=gen), torch.rand(5, 3, 16, 16, generator=gen)
    res = appearance.appearance_metrics(a, b, lpips=lambda x, y: (x - y).abs().mean((1, 2, 3)), batch_size=2)
    expected = (a - b).abs().mean((1, 2, 3))
    assert res.lpips_per_view == pytest.approx(expected.tolist()) and res.lpips_unavailable_reason is None


_BACKBONE = appearance.lpips_backbone_path()


@pytest.mark.skipif(not os.path.isfile(_BACKBONE),
                    reason=f"LPIPS VGG backbone weights absent from the torch hub cache ({_BACKBONE})")
def test_lpips_with_cached_weights_returns_a_float():
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = appearance.appearance_metrics(img, (img * 0.7).clamp(0, 1))
    assert isinstance(res.lpips, float) and res.lpips > 0 and res.lpips_unavailable_reason is None
    assert appearance.appearance_metrics(img, img).lpips == pytest.approx(0.0, abs=1e-6)


def test_ssim_2023_variant_infers_the_range_and_crops_the_border():
    """SyncDreamer's SSIM (torchmetrics 2023 defaults): data range inferred per image pair, the 5-px
    reflect-padding border cropped off the SSIM map. Checked against what each choice implies."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 48, 48, generator=gen) * 0.8 + 0.1
    b = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    old = appearance.ssim_per_view(a, b, "torchmetrics_2023")
    # the same SSIM map as torchmetrics' data_range=None, averaged over the interior only
    for i in range(2):
        _, full = tm_ssim(b[i:i + 1], a[i:i + 1], data_range=None, return_full_image=True)
        assert float(old[i]) == pytest.approx(float(full[..., 5:-5, 5:-5].mean()), abs=1e-6)
    # range inferred: scaling both images by 0.5 changes nothing (with data_range=1 it does)
    half = appearance.ssim_per_view(a * 0.5, b * 0.5, "torchmetrics_2023")
    assert torch.allclose(half, old, atol=1e-5)
    new = appearance.ssim_per_view(a, b)
    assert not torch.allclose(appearance.ssim_per_view(a * 0.5, b * 0.5), new, atol=1e-3)
    # the border's map entries are not scored: a difference in the outer 5 rows costs less than with
    # the whole map (windows of interior pixels still reach into the border, so it is not 1)
    c = a.clone()
    c[..., :5, :] = 1 - c[..., :5, :]
    cropped = appearance.ssim_per_view(a, c, "torchmetrics_2023")
    whole = torch.stack([tm_ssim(c[i:i + 1], a[i:i + 1], data_range=None) for i in range(2)])
    assert (cropped > whole + 0.02).all() and (cropped < 1).all()
    with pytest.raises(ValueError, match="unknown SSIM variant"):
        appearance.ssim_per_view(a, b, "skimage")


def test_appearance_on_novel_views_only():
    gen = torch.Generator().manual_seed(2)
    img = torch.rand(4, 3, 32, 32, generator=gen)
    other = img.clone()
    other[0] = 1 - other[0]  # only view 0 (the input view) differs
    novel = appearance.appearance_metrics(img, other, lpips=None, views=[1, 2, 3])
    assert novel.num_views == 3 and novel.views == [1, 2, 3] and novel.psnr == 100.0
    assert appearance.appearance_metrics(img, other, lpips=None).psnr < 100
