"""Ground-truth meshes for rendered object folders: the source mesh moved into the renderer's
normalised frame, checked against the masks Blender rendered, written as folder/mesh.glb + mesh.json.
Used by every GT maker (data_prep.gso, data_prep.real_meshes, data_prep.toy_data, the demo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_prep.render_io import ObjectSource
from nova3d.atomic import write_json_atomic
from nova3d.cameras import Cameras, project_points
from nova3d.data import schema
from nova3d.mesh_io import Y_UP_TO_Z_UP, load_mesh, save_mesh

GT_MESH, MESH_INFO = "mesh.glb", "mesh.json"
MAX_OUTSIDE = 0.02  # share of vertices allowed to miss the (dilated) mask in any view
GSO_TEXTURE = Path("materials") / "textures" / "texture.png"  # where GSO's model.mtl points
AXIS_NOTES = {".obj": "Blender OBJ importer defaults: forward -Z, up Y",
              ".glb": "glTF files are Y-up: Blender's importer and nova3d.mesh_io turn them Z-up alike"}


def outer_surface(mesh):
    """`mesh` (trimesh) without the faces its closed pieces hide inside each other: the boolean union
    (manifold3d) of its closed connected components, with its open components kept as they are.
    Multi-part models (a teddy made of overlapping convex pieces, a robot's overlapping links) have
    surface inside the solid that no view sees and no method reconstructs; scoring against it
    charges a fit for surface that is not there (as data_prep.procedural.solid_object avoids for
    the procedural set). Returns (surface, share of the area removed); the mesh itself, and 0.0,
    when there is nothing to merge or the union would add area (inconsistent pieces: inverted
    normals, self-intersections), so it never invents surface."""
    import trimesh

    parts = mesh.split(only_watertight=False)
    closed = [p for p in parts if p.is_volume]
    if len(closed) < 2:
        return mesh, 0.0
    try:
        union = trimesh.boolean.union(closed, engine="manifold")
    except Exception:  # manifold3d refuses some inputs; the mesh as it is stays the truth
        return mesh, 0.0
    surface = trimesh.util.concatenate([union, *[p for p in parts if not p.is_volume]])
    if surface.area >= mesh.area:
        return mesh, 0.0
    return surface, float(1 - surface.area / mesh.area)


def normalised_mesh(obj_path: Path, normalisation: dict):
    """The OBJ as a trimesh in the renderer's normalised world frame (module docstring)."""
    # Y-up -> Z-up as Blender's OBJ importer turns it; GSO's model.mtl points at
    # ../materials/textures/texture.png, which load_mesh's resolver allows.
    mesh = load_mesh(obj_path)
    if len(mesh.faces) == 0:
        raise ValueError(f"trimesh reads no faces from {obj_path}")
    texture = obj_path.parent.parent / GSO_TEXTURE  # GSO's layout
    material = getattr(mesh.visual, "material", None)
    if material is not None and getattr(material, "image", None) is None and texture.is_file():
        from PIL import Image

        material.image = Image.open(texture).convert("RGB")  # an .mtl naming it some other way
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    mesh.vertices = (verts + np.asarray(normalisation["offset"])) * float(normalisation["scale"])
    return mesh


def _colour_kind(mesh) -> str:
    material = getattr(mesh.visual, "material", None)
    if mesh.visual.kind == "texture" and getattr(material, "image", None) is not None:
        return "texture"
    return mesh.visual.kind or "none"


def mask_agreement(verts: np.ndarray, cameras: Cameras, masks: np.ndarray) -> list[float]:
    """Per view, the share of the vertices [N, 3] landing in the image that land inside the mask
    [V, H, W] (bool), dilated by res/128 pixels (at least 1) for anti-aliased edges and thin parts.
    Vertices outside the frame (a wide object seen side-on) cannot be checked and do not count,
    unless most of them are: then the view counts as a miss (0)."""
    V, H, W = masks.shape
    radius = max(1, round(W / 128))
    m = torch.from_numpy(masks).float()[:, None]
    dilated = torch.nn.functional.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0
    pix, depth = project_points(torch.as_tensor(verts, dtype=torch.float32), cameras.c2w, cameras.K)
    col, row = pix[..., 0].floor().long(), pix[..., 1].floor().long()
    valid = (col >= 0) & (col < W) & (row >= 0) & (row < H) & (depth > 0)
    hit = torch.zeros_like(valid)
    views = torch.arange(V)[:, None].expand_as(col)
    hit[valid] = dilated[views[valid], row[valid], col[valid]]
    in_frame = valid.float().sum(1)
    share = hit.float().sum(1) / in_frame.clamp_min(1)
    return torch.where(in_frame >= 0.5 * valid.shape[1], share, torch.zeros_like(share)).tolist()


def write_gt_mesh(source: ObjectSource, folder: Path, max_outside: float = MAX_OUTSIDE, *,
                  staging: dict | None = None) -> dict:
    """Write folder/mesh.glb (+ mesh.json) for a rendered object; ValueError if more than `max_outside`
    of its vertices miss a view's mask (it disagrees with the renders). `staging`: how the OBJ Blender
    read was made from the source (stage_obj), recorded in mesh.json."""
    from nova3d.data.png import read_png

    meta = schema.ObjectMeta.load(folder / schema.META_FILE)
    cameras = Cameras.load(folder / schema.CAMERAS_FILE)
    mesh = normalised_mesh(source.path, meta.normalisation)
    low, high = mesh.bounds
    if abs(float((high - low).max()) - 1) > 1e-3 or float(np.abs(low + high).max()) > 2e-3:
        raise ValueError(f"GT mesh bounds {low.round(4).tolist()}..{high.round(4).tolist()} are not the unit box "
                         "the renderer made: trimesh and Blender read different geometry")
    masks = np.stack([read_png(folder / schema.MASK_DIR / schema.view_name(i), 1, np.uint8)[0] > 127
                      for i in range(meta.num_views)])
    inside = mask_agreement(np.asarray(mesh.vertices), cameras, masks)
    if min(inside) < 1 - max_outside:
        worst = int(np.argmin(inside))
        raise ValueError(f"GT mesh disagrees with the renders: only {inside[worst]:.1%} of its vertices project "
                         f"into view {worst}'s mask (axis convention?)")
    info = {"source": source.source,
            "frame": "nova3d world (Z up) in memory; mesh.glb stored glTF Y-up by nova3d.mesh_io",
            "axis_conversion": {"file_to_blender": Y_UP_TO_Z_UP[:3, :3].tolist(), "note": AXIS_NOTES.get(
                Path(source.path).suffix.lower(), "as nova3d.mesh_io.load_mesh reads it")},
            "staging": staging,
            "normalisation": meta.normalisation, "colour": _colour_kind(mesh),
            "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "vertices_in_mask_min": min(inside), "vertices_in_mask_mean": float(np.mean(inside))}
    write_json_atomic(folder / MESH_INFO, info)
    save_mesh(mesh, folder / GT_MESH)  # atomic, last: mesh.glb marks the object done
    return info
