"""Ground-truth folders for the evaluation harness without Blender: a mesh, normalised to the unit
box like data_prep's renderer does, rendered with nova3d.eval.mesh_render at an orbit, written as
an object folder (nova3d.data.schema) plus mesh.glb — the layout data_prep/gso.py produces.
Used by tests/test_eval_protocol.py and bench/eval_speed.py.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from nova3d.cameras import OrbitSpec, orbit_cameras
from nova3d.data import schema
from nova3d.data.png import encode_png16
from nova3d.eval.mesh_render import render_mesh
from nova3d.eval.protocol import load_mesh
from nova3d.mesh_io import save_mesh


def unit_box(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy centred at the origin with its longest side 1 (the renderer's normalisation)."""
    mesh = mesh.copy()
    low, high = mesh.bounds
    mesh.apply_translation(-(low + high) / 2)
    mesh.apply_scale(1.0 / float((high - low).max()))
    return mesh


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_gt_object(root: str | Path, object_id: str, mesh: trimesh.Trimesh, views: int = 4, res: int = 64,
                    elevation_deg: float = 20.0, supersample: int = 1, fov_deg: float = 49.1) -> Path:
    """root/object_id/: views of unit_box(mesh) + cameras.json + meta.json + mesh.glb.

    Normal maps are a placeholder (every covered pixel faces its camera): the harness does not
    read them, but the schema wants the files. Returns the folder.
    """
    folder = Path(root) / object_id
    folder.mkdir(parents=True, exist_ok=True)
    save_mesh(unit_box(mesh), folder / "mesh.glb")
    # Views of the file as read back (what the harness compares against).
    cams = orbit_cameras(OrbitSpec(num_views=views, resolution=res, elevation_deg=elevation_deg, fov_deg=fov_deg))
    out = render_mesh(load_mesh(folder / "mesh.glb"), cams, image_size=res, background=0.0, supersample=supersample)
    for sub in (schema.RGB_DIR, schema.NORMAL_DIR, schema.MASK_DIR, schema.DEPTH_DIR):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    alpha = out.mask[:, 0].numpy()
    straight = (out.rgb / out.mask.clamp_min(1e-6)).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # un-premultiply
    for i in range(views):
        name = schema.view_name(i)
        a8 = np.round(alpha[i] * 255).astype(np.uint8)
        rgba = np.dstack([np.round(straight[i] * 255).astype(np.uint8), a8])
        (folder / schema.RGB_DIR / name).write_bytes(_png(Image.fromarray(rgba, "RGBA")))
        (folder / schema.MASK_DIR / name).write_bytes(_png(Image.fromarray(((a8 >= 128) * 255).astype(np.uint8), "L")))
        normal = np.where(a8[..., None] >= 128, [32768, 32768, 65535], 32768).astype(np.uint16)
        (folder / schema.NORMAL_DIR / name).write_bytes(encode_png16(normal))
        depth = np.round(out.depth[i, 0].numpy() * schema.DEPTH_SCALE).astype(np.uint16)
        (folder / schema.DEPTH_DIR / name).write_bytes(encode_png16(depth[..., None]))
    cams.save(folder / schema.CAMERAS_FILE)
    schema.ObjectMeta(object_id=object_id, source="tests.helpers_eval", num_views=views, resolution=res,
                      normalisation={"scale": 1.0, "offset": [0.0, 0.0, 0.0], "frame": "already unit box"},
                      renderer={"name": "nova3d.eval.mesh_render"}, has_depth=True).save(folder / schema.META_FILE)
    return folder
