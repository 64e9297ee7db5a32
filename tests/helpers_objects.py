"""Synthetic object folders that follow `nova3d.data.schema`, made with numpy/PIL only.

The object is an ellipsoid with an analytic colour pattern, so every view differs (roll
tests can tell view s from view 0) and its normals are exact (unit-normal tests can check
them). Used by the shard, datamodule and fusion tests and by bench/data_throughput.py.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nova3d.cameras import Cameras, OrbitSpec, convert_normal_frame, orbit_cameras, pixel_rays
from nova3d.data import schema
from nova3d.data.png import encode_png16

RADII = (0.45, 0.3, 0.35)  # ellipsoid half-axes (x, y, z) inside the unit box


@dataclass
class SyntheticViews:
    """Ground truth of a synthetic object; images are [V, H, W, C] float arrays."""

    cameras: Cameras
    rgb: np.ndarray  # [V, H, W, 3] straight colour in [0, 1]
    mask: np.ndarray  # [V, H, W] bool
    normals_world: np.ndarray  # [V, H, W, 3] unit normals on the mask, 0 elsewhere
    normals_stored: np.ndarray  # [V, H, W, 3] in cameras.normal_frame, as written to normal/
    depth: np.ndarray  # [V, H, W] distance along the camera axis, 0 off the object


def synthetic_views(views: int = 4, res: int = 32, *, seed: int = 0, noise: float = 0.0,
                    normal_frame: str = "input_view", radii: tuple = RADII) -> SyntheticViews:
    """Ray-trace an ellipsoid from an orbit of `views` cameras at `res`²."""
    cams = orbit_cameras(OrbitSpec(num_views=views, resolution=res))
    cams.normal_frame = normal_frame
    origins, dirs = pixel_rays(cams.c2w, cams.K, res, res)
    r = torch.tensor(radii)
    o, d = origins / r, dirs / r
    a, b, c = (d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - 1
    disc = b * b - 4 * a * c
    mask = disc > 0
    t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    points = origins + t[..., None] * dirs
    normals = torch.nn.functional.normalize(points / r**2, dim=-1) * mask[..., None]
    # Colour varies with position and faces a light, so each view looks different.
    light = torch.nn.functional.normalize(torch.tensor([0.3, -0.8, 0.5]), dim=0)
    shade = 0.35 + 0.65 * (normals @ light).clamp_min(0)
    pattern = 0.5 + 0.5 * torch.stack([torch.sin(9 * points[..., 0]), torch.sin(7 * points[..., 2] + 1),
                                       torch.cos(8 * points[..., 1])], dim=-1)
    rgb = (pattern * shade[..., None]).clamp(0, 1) * mask[..., None]
    if noise > 0:  # render noise makes compression realistic
        gen = torch.Generator().manual_seed(seed)
        rgb = (rgb + noise * torch.randn(rgb.shape, generator=gen)).clamp(0, 1) * mask[..., None]
    forward = -cams.c2w[:, None, None, :3, 2]  # opengl cameras look down -z
    depth = (t * (dirs * forward).sum(-1)).clamp_min(0) * mask
    stored = convert_normal_frame(normals, cams.c2w, "world", normal_frame, cams.input_view) * mask[..., None]
    return SyntheticViews(cams, rgb.numpy(), mask.numpy(), normals.numpy(), stored.numpy(), depth.numpy())


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_object_folder(root: str | Path, object_id: str = "obj", views: int = 4, res: int = 32, *,
                       with_depth: bool = False, seed: int = 0, noise: float = 0.0,
                       normal_frame: str = "input_view") -> Path:
    """Write a complete object folder `root/object_id` per nova3d.data.schema; returns its path."""
    gt = synthetic_views(views, res, seed=seed, noise=noise, normal_frame=normal_frame)
    folder = Path(root) / object_id
    dirs = [schema.RGB_DIR, schema.NORMAL_DIR, schema.MASK_DIR] + ([schema.DEPTH_DIR] if with_depth else [])
    for sub in dirs:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(views):
        name = schema.view_name(i)
        alpha = gt.mask[i].astype(np.uint8) * 255
        rgba = np.dstack([np.round(gt.rgb[i] * 255).astype(np.uint8), alpha])
        (folder / schema.RGB_DIR / name).write_bytes(_png(Image.fromarray(rgba, "RGBA")))
        encoded = np.round((gt.normals_stored[i] + 1) / 2 * 65535).astype(np.uint16)
        (folder / schema.NORMAL_DIR / name).write_bytes(encode_png16(encoded))
        (folder / schema.MASK_DIR / name).write_bytes(_png(Image.fromarray(alpha, "L")))
        if with_depth:
            depth = np.round(gt.depth[i] * schema.DEPTH_SCALE).astype(np.uint16)
            (folder / schema.DEPTH_DIR / name).write_bytes(encode_png16(depth[..., None]))
    gt.cameras.save(folder / schema.CAMERAS_FILE)
    schema.ObjectMeta(object_id=object_id, source="procedural:test_ellipsoid", num_views=views,
                      resolution=res, has_depth=with_depth,
                      renderer={"name": "tests.helpers_objects"}).save(folder / schema.META_FILE)
    return folder


def rewrite_tar(src: str | Path, dst: str | Path, edit) -> None:
    """Copy a tar member by member; `edit(name, data)` returns new bytes, or None to drop the member."""
    import tarfile

    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            data = edit(member.name, tin.extractfile(member).read())
            if data is None:
                continue
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
