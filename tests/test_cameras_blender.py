"""nova3d.cameras agrees with Blender: our projection of a mesh lands on Cycles' renders of it.

Objects are rendered by data_prep.render_views (the real pipeline: glTF export, Blender import,
normalisation, cameras from cameras.json) with per-view elevations and a random start azimuth,
then the same mesh, normalised with meta.json's scale/offset, is rasterised with pytorch3d
through our cameras (convert_c2w to OpenCV + cameras_from_opencv_projection). Silhouettes,
normals (world -> input_view with convert_normal_frame) and depth must match.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_png

from data_prep.procedural import make_object
from data_prep.render_io import RenderSettings, collect_sources
from nova3d.cameras import (Cameras, convert_c2w, convert_normal_frame, decode_normals, project_points,
                            world_to_camera)
from nova3d.data import schema

pytestmark = pytest.mark.slow

OBJECTS = ("bracket", "arrow", "mug", "desk_lamp", "torus_knot", "crate")  # flat, smooth, concave, thin
RES, VIEWS = 128, 16
MIN_IOU, MAX_MEAN_ANGLE_DEG = 0.95, 5.0
OBSERVED: dict[str, list] = {"iou": [], "angle": [], "depth": []}  # printed at the end (-s)


def _png(path: Path) -> np.ndarray:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return decode_png(data, mode=ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> Path:
    from data_prep.render_views import render_objects

    out = tmp_path_factory.mktemp("blender_cams")
    settings = RenderSettings(views=VIEWS, resolution=RES, samples=4, denoise=False, depth=True,
                              elevation=tuple(np.linspace(-25.0, 40.0, VIEWS).tolist()),
                              random_azimuth=True, seed=7)
    summary = render_objects(collect_sources([], list(OBJECTS)), out, settings, progress=False)
    assert not summary.failed, summary.failed
    return out


def _rasterise(name: str, folder: Path) -> tuple[Cameras, dict[str, torch.Tensor], np.ndarray]:
    """Our cameras' view of the normalised mesh: mask [V,H,W], world normals [V,H,W,3], depth [V,H,W]."""
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
    from pytorch3d.structures import Meshes
    from pytorch3d.utils import cameras_from_opencv_projection

    cams = Cameras.load(folder / schema.CAMERAS_FILE)
    norm = schema.ObjectMeta.load(folder / schema.META_FILE).normalisation
    mesh = make_object(name)
    verts = (np.asarray(mesh.vertices) + norm["offset"]) * norm["scale"]
    verts_t = torch.tensor(verts, dtype=torch.float32)
    faces = torch.tensor(np.asarray(mesh.faces), dtype=torch.int64)
    vnormals = torch.tensor(np.asarray(mesh.vertex_normals), dtype=torch.float32)  # what the .glb carries

    w2c = world_to_camera(convert_c2w(cams.c2w, "opengl", "opencv"))
    size = torch.tensor([[cams.height, cams.width]] * len(cams))
    p3d = cameras_from_opencv_projection(w2c[:, :3, :3], w2c[:, :3, 3], cams.K, size)
    raster = MeshRasterizer(cameras=p3d, raster_settings=RasterizationSettings(
        image_size=(cams.height, cams.width), blur_radius=0.0, faces_per_pixel=1, bin_size=0))
    frags = raster(Meshes([verts_t], [faces]).extend(len(cams)))
    face = frags.pix_to_face[..., 0]
    hit = face >= 0
    local = torch.where(hit, face % len(faces), torch.zeros_like(face))
    tri_normals = vnormals[faces][local]  # [V, H, W, 3 corners, 3]
    normals = torch.nn.functional.normalize((frags.bary_coords[..., 0, :, None] * tri_normals).sum(-2), dim=-1)
    return cams, {"mask": hit, "normals": normals, "depth": frags.zbuf[..., 0]}, verts


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 erosion of [V, H, W] bool masks: keeps pixels away from silhouette edges."""
    pooled = -torch.nn.functional.max_pool2d(-mask.float()[:, None], 3, stride=1, padding=1)
    return pooled[:, 0] > 0.5


@pytest.mark.parametrize("name", OBJECTS)
def test_blender_matches_our_cameras(renders: Path, name: str) -> None:
    folder = renders / name
    cams, ours, verts = _rasterise(name, folder)
    views = range(len(cams))
    blender_mask = torch.from_numpy(np.stack(
        [np.asarray(Image.open(folder / schema.MASK_DIR / schema.view_name(i))) > 127 for i in views]))

    # Silhouettes: IoU in every view.
    inter = (blender_mask & ours["mask"]).flatten(1).sum(1).float()
    union = (blender_mask | ours["mask"]).flatten(1).sum(1).float()
    iou = inter / union
    OBSERVED["iou"].append((name, float(iou.min())))
    assert (iou >= MIN_IOU).all(), f"{name}: IoU per view {iou.tolist()}"

    # Every vertex projects onto the (1-pixel dilated) Blender silhouette.
    pix, depth = project_points(torch.tensor(verts, dtype=torch.float32), cams.c2w, cams.K)
    assert (depth > 0).all()
    dilated = torch.nn.functional.max_pool2d(blender_mask.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    col = pix[..., 0].floor().long().clamp(0, cams.width - 1)
    row = pix[..., 1].floor().long().clamp(0, cams.height - 1)
    on_mask = dilated[torch.arange(len(cams))[:, None], row, col]
    assert on_mask.float().mean() >= 0.995, f"{name}: {on_mask.float().mean():.4f} of vertices on the mask"

    # Normals: stored in the input view's frame; ours go world -> input_view with the same function.
    stored = torch.from_numpy(np.stack(
        [_png(folder / schema.NORMAL_DIR / schema.view_name(i)) for i in views]).astype(np.float32) / 65535)
    blender_n = decode_normals(stored)
    ours_n = convert_normal_frame(ours["normals"], cams.c2w, "world", "input_view", cams.input_view)
    inside = _erode(blender_mask) & _erode(ours["mask"])
    cos = (blender_n * ours_n).sum(-1).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos))[inside]
    OBSERVED["angle"].append((name, float(angle.mean()), float(angle.median())))
    assert angle.mean() <= MAX_MEAN_ANGLE_DEG, f"{name}: mean normal error {angle.mean():.2f} deg"

    # Depth is the distance along the camera axis (pytorch3d's zbuf), in schema.DEPTH_SCALE units.
    blender_d = torch.from_numpy(np.stack(
        [_png(folder / schema.DEPTH_DIR / schema.view_name(i))[..., 0] for i in views]).astype(np.float32))
    err = (blender_d / schema.DEPTH_SCALE - ours["depth"]).abs()[inside]
    OBSERVED["depth"].append((name, float(err.median())))
    assert err.median() < 2e-3 and (err < 0.01).float().mean() > 0.95, f"{name}: depth error {err.median():.4f}"


def test_report_observed(renders: Path) -> None:
    """Not a check: prints what the comparisons measured (run with -s to see it)."""
    print("\nmin IoU per object:", OBSERVED["iou"])
    print("normal angle (mean, median) deg:", OBSERVED["angle"])
    print("depth median abs error:", OBSERVED["depth"])
