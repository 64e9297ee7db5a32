"""From fitted fields to mesh files (DESIGN.md §4 "Export"): marching cubes on the SDF, clean-up,
vertex colours (from a color_fn: the colour field, or the views projected by nova3d.fusion.view_colors),
an optional xatlas UV texture, and .glb/.obj/.ply files.

World units throughout (the field's cube is [-bound, bound]^3, SDF < 0 inside). Callables
stand in for the fields, so this module knows nothing of networks:
  sdf_fn(points [P, 3]) -> sdf [P]
  color_fn(points [P, 3], outward normals [P, 3]) -> rgb [P, 3] in [0, 1]
They are called without gradients, in chunks, on the device of the module they are bound to
(e.g. `system.sdf_fn` of a LightningModule on CUDA), or on `device` when given.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from torch import Tensor
from tqdm.auto import tqdm

from nova3d.errors import Nova3DError
from nova3d.fusion.view_colors import ViewColorConfig
from nova3d.mesh_io import save_mesh

MESH_FORMATS = ("glb", "obj", "ply")
SdfFn = Callable[[Tensor], Tensor]
ColorFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class MeshExportConfig:
    resolution: int = 192  # marching-cubes grid points per axis over the field's cube
    chunk: int = 65536  # points per sdf_fn / color_fn call
    min_component_fraction: float = 0.05  # drop components with fewer faces than this x the largest
    cut_unseen_underside: bool = True  # nothing below the lowest point a view sees (nova3d.fusion.underside)
    # nor above the highest one (a table's top seen from below: elevation-0 cameras leave a dome over a
    # flat top above them). Measured before it became the default: the table's IoU 0.279 -> 0.336, the
    # mug's held-out PSNR 24.20 -> 25.62 dB; duck, torus_knot and block_tower unchanged (docs/benchmarks.md)
    cut_unseen_top: bool = True
    # field.pt in the result: the fitted fields and poses, so other export settings can be tried
    # without a refit (nova3d fuse --from-field; ~10 MB at the default grid)
    save_field: bool = False
    # Texture colours: "views" projects the input views (weighted by their conflict maps) onto the
    # mesh, with the colour field where no view sees it (nova3d.fusion.view_colors); "field" is
    # the colour field alone (NOVA3D's / Wonder3D's export, blurrier: docs/benchmarks.md).
    color_source: str = "views"
    view_colors: ViewColorConfig = field(default_factory=ViewColorConfig)
    uv_texture: bool = False  # also bake an xatlas UV texture (vertex colours are always written)
    texture_size: int = 1024
    formats: list[str] = field(default_factory=lambda: list(MESH_FORMATS))


def _device_of(fn: Callable, device: torch.device | str | None) -> torch.device:
    """`device`, else the device of the module `fn` is a bound method of, else CPU."""
    if device is not None:
        return torch.device(device)
    owner = getattr(fn, "__self__", None)
    dev = getattr(owner, "device", None)  # LightningModule
    if isinstance(dev, torch.device):
        return dev
    if isinstance(owner, torch.nn.Module):
        p = next(owner.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def _chunked(fn: Callable, inputs: list[Tensor], chunk: int, device: torch.device, desc: str,
             progress: bool) -> Tensor:
    """fn(*[x[s:e] for x in inputs]) over row chunks, moved to `device` and back to CPU float32."""
    n = inputs[0].shape[0]
    outs = []
    for s in tqdm(range(0, n, chunk), desc=desc, leave=False, disable=not progress or n <= chunk):
        outs.append(fn(*[x[s:s + chunk].to(device) for x in inputs]).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


@torch.no_grad()
def _eval_indices(sdf_fn: SdfFn, lin: Tensor, flat: Tensor, n: int, chunk: int, device: torch.device,
                  bar) -> Tensor:
    """sdf_fn at the grid points with flat indices `flat` (x-major over an n^3 grid of `lin`)."""
    out = torch.empty(len(flat))
    for s in range(0, len(flat), chunk):  # coordinates made per chunk: a full grid would be 3x the volume
        idx = flat[s:s + chunk]
        pts = torch.stack([lin[idx // (n * n)], lin[(idx // n) % n], lin[idx % n]], dim=-1)
        out[s:s + len(idx)] = sdf_fn(pts.to(device)).reshape(-1).float().cpu()
        bar.update(len(idx))
    return out


@dataclass
class SdfGrid:
    values: np.ndarray  # [N, N, N] float32 indexed [x, y, z]; exact where evaluated, else +-fill
    evaluated: int  # sdf_fn calls (points)
    lo: float  # min / max over the evaluated points
    hi: float
    fill: float = 0.0  # the magnitude given to points not evaluated (0: every point was)


@torch.no_grad()
def sample_grid(sdf_fn: SdfFn, bound: float, resolution: int, chunk: int = 65536,
                device: torch.device | str | None = None, progress: bool = True, coarse: int = 4,
                margin: float = 1.5) -> SdfGrid:
    """SDF on the grid of `resolution`^3 points spanning [-bound, bound]^3, coarse to fine.

    coarse > 1: the SDF is first taken every `coarse` points; the fine points are evaluated
    only inside coarse cells that contain a sign change or a corner with |sdf| < `margin`
    coarse-cell diagonals. Elsewhere every corner of the cell has the same sign and is further
    than the cell's size from the surface, so for an SDF with |grad| <= margin no zero crossing
    can hide there: those points get the coarse sign times the margin distance, and marching
    cubes gives the same mesh as the dense grid (coarse=1) at a fraction of the evaluations
    (~15% at 192^3 with coarse=4 for a sphere; NeuS fields are trained towards |grad| = 1).
    Floaters smaller than a coarse cell can be missed (clean_mesh would drop them anyway).
    """
    n = resolution
    if n < 2:
        raise Nova3DError(f"mesh export: resolution must be >= 2, got {n}")
    device = _device_of(sdf_fn, device)
    lin = torch.linspace(-bound, bound, n)
    bar = tqdm(desc="marching cubes grid", unit="pt", unit_scale=True, leave=False,
               disable=not progress or n ** 3 <= chunk)
    if coarse <= 1 or n < 4 * coarse:
        values = _eval_indices(sdf_fn, lin, torch.arange(n ** 3), n, chunk, device, bar)
        bar.close()
        lo, hi = (float(values.min()), float(values.max())) if values.isfinite().all() else (math.nan, math.nan)
        return SdfGrid(values.reshape(n, n, n).numpy(), n ** 3, lo, hi)
    ci = torch.arange(0, n, coarse)
    if ci[-1] != n - 1:
        ci = torch.cat([ci, torch.tensor([n - 1])])
    C = len(ci)
    flat_c = ((ci[:, None, None] * n + ci[None, :, None]) * n + ci[None, None, :]).reshape(-1)
    vc = _eval_indices(sdf_fn, lin, flat_c, n, chunk, device, bar).reshape(C, C, C)
    corners = torch.stack([vc[i:C - 1 + i, j:C - 1 + j, k:C - 1 + k]
                           for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # [8, C-1, C-1, C-1]
    fill = margin * coarse * (2.0 * bound / (n - 1)) * math.sqrt(3.0)
    band = ((corners.amin(0) < 0) & (corners.amax(0) > 0)) | (corners.abs().amin(0) < fill)
    band |= ~corners.isfinite().all(0)  # evaluate around NaNs: extract_mesh reports them
    # Fine point i lies in coarse cell own[i] and, on a coarse cell boundary, also in own[i] - 1.
    i = torch.arange(n)
    own = (torch.searchsorted(ci, i, right=True) - 1).clamp(max=C - 2)
    prev = torch.where((ci[own] == i) & (own > 0), own - 1, own)
    fine = torch.zeros(n, n, n, dtype=torch.bool)
    for mx in (own, prev):
        for my in (own, prev):
            for mz in (own, prev):
                fine |= band[mx[:, None, None], my[None, :, None], mz[None, None, :]]
    sign = torch.sign(vc[:C - 1, :C - 1, :C - 1])[own[:, None, None], own[None, :, None], own[None, None, :]]
    values = (sign * fill).reshape(-1)
    flat = fine.reshape(-1).nonzero()[:, 0]
    bar.total = len(flat_c) + len(flat)
    values[flat] = _eval_indices(sdf_fn, lin, flat, n, chunk, device, bar)
    bar.close()
    seen = torch.cat([vc.reshape(-1), values[flat]])
    lo, hi = (float(seen.min()), float(seen.max())) if seen.isfinite().all() else (math.nan, math.nan)
    return SdfGrid(values.reshape(n, n, n).numpy(), len(flat_c) + len(flat), lo, hi, fill)


def extract_mesh(sdf_fn: SdfFn, bound: float, resolution: int = 192, chunk: int = 65536,
                 device: torch.device | str | None = None, progress: bool = True,
                 coarse: int = 4) -> trimesh.Trimesh:
    """Marching cubes of the SDF's zero level set over [-bound, bound]^3.

    Returns a trimesh (vertices [N, 3] in world units, faces [F, 3] wound so that normals
    point to sdf > 0, i.e. outward). The grid is padded with one cell of positive SDF, so a
    surface that reaches the cube's faces is closed just outside them (always watertight).
    Nova3DError when the field has no zero crossing in the cube ("empty field"). `coarse`:
    see sample_grid (1 = evaluate every grid point).
    """
    from skimage.measure import marching_cubes

    grid = sample_grid(sdf_fn, bound, resolution, chunk, device, progress, coarse)
    sdf, lo, hi = grid.values, grid.lo, grid.hi
    if not np.isfinite(sdf).all():
        raise Nova3DError(f"mesh export: the SDF has {int((~np.isfinite(sdf)).sum())} non-finite values "
                          "on the marching-cubes grid (the fit diverged)")
    if not lo < 0.0 < hi:
        raise Nova3DError(f"mesh export: empty field, the SDF has no zero crossing in [-{bound}, {bound}]^3 "
                          f"at {resolution}^3 (min {lo:.3g}, max {hi:.3g})")
    h = 2.0 * bound / (resolution - 1)
    padded = np.pad(sdf, 1, constant_values=h)
    # skimage's "descent" winds faces so that normals point to larger values: sdf > 0, outward.
    verts, faces, _, _ = marching_cubes(padded, level=0.0, spacing=(h, h, h), gradient_direction="descent",
                                        allow_degenerate=False)
    verts = verts - (bound + h)  # undo the pad cell and move the grid's corner to -bound
    return trimesh.Trimesh(verts.astype(np.float64), faces.astype(np.int64), process=False)


def clean_mesh(mesh: trimesh.Trimesh, min_component_fraction: float = 0.05) -> trimesh.Trimesh:
    """A copy with duplicate vertices merged, degenerate faces removed and connected components
    with fewer faces than `min_component_fraction` x the largest one's dropped (floaters)."""
    mesh = mesh.copy()
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    if len(mesh.faces) and min_component_fraction > 0:
        labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
        counts = np.bincount(labels)
        keep = counts >= min_component_fraction * counts.max()
        mesh.update_faces(keep[labels])
    mesh.remove_unreferenced_vertices()
    return mesh


def _to_uint8(rgb: Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def color_vertices(mesh: trimesh.Trimesh, color_fn: ColorFn, chunk: int = 65536,
                   device: torch.device | str | None = None, progress: bool = True) -> trimesh.Trimesh:
    """Store color_fn(vertex [N, 3], vertex normal [N, 3]) as uint8 vertex colours (in place;
    returns `mesh`). Vertex normals are trimesh's area-weighted face normals (outward)."""
    device = _device_of(color_fn, device)
    pts = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    nrm = torch.tensor(np.asarray(mesh.vertex_normals), dtype=torch.float32)
    rgb = _chunked(color_fn, [pts, nrm], chunk, device, "vertex colours", progress)
    rgba = np.concatenate([_to_uint8(rgb.reshape(-1, 3)), np.full((len(pts), 1), 255, np.uint8)], axis=1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh


def _raster_uv(tri: Tensor, size: int, max_pairs: int = 1 << 22):
    """Texels whose centres lie in UV triangles. tri [F, 3, 2] in texel units (x right, y down).

    Returns (face index [T], texel index y*size + x [T], barycentrics [T, 3]), one entry per
    covered texel (a texel on an edge shared by two faces goes to one of them).
    """
    lo = torch.ceil(tri.amin(1) - 0.5).clamp(0, size - 1).long()  # first texel centre >= min
    hi = torch.floor(tri.amax(1) - 0.5).clamp(0, size - 1).long()
    wh = (hi - lo + 1).clamp_min(0)
    counts = wh[:, 0] * wh[:, 1]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1 = b - a, c - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    ok = den.abs() > 1e-12  # zero-area UV triangles cover nothing
    faces_out, texels_out, bary_out = [], [], []
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < len(tri):  # face chunks of at most ~max_pairs (face, texel) candidates
        base = ends[start - 1] if start else torch.tensor(0)
        stop = int(torch.searchsorted(ends, base + max_pairs, right=True).clamp(min=start + 1))
        f = torch.arange(start, stop)
        f = f.repeat_interleave(counts[start:stop])
        first = torch.cumsum(counts[start:stop], 0) - counts[start:stop]
        local = torch.arange(len(f)) - first.repeat_interleave(counts[start:stop])
        x = lo[f, 0] + local % wh[f, 0]
        y = lo[f, 1] + local // wh[f, 0].clamp_min(1)
        p = torch.stack([x, y], -1).to(tri) + 0.5 - a[f]
        l1 = (p[:, 0] * v1[f, 1] - v1[f, 0] * p[:, 1]) / den[f]
        l2 = (v0[f, 0] * p[:, 1] - p[:, 0] * v0[f, 1]) / den[f]
        bary = torch.stack([1 - l1 - l2, l1, l2], -1)
        inside = ok[f] & (bary >= -1e-5).all(-1)
        faces_out.append(f[inside])
        texels_out.append((y * size + x)[inside])
        bary_out.append(bary[inside])
        start = stop
    faces, texels, bary = torch.cat(faces_out), torch.cat(texels_out), torch.cat(bary_out)
    owner = torch.full((size * size,), -1, dtype=torch.long)
    owner[texels] = torch.arange(len(texels))
    first = owner[texels] == torch.arange(len(texels))  # one entry per texel
    return faces[first], texels[first], bary[first]


def _dilate(image: Tensor, filled: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Grow image [H, W, 3] outward from `filled` [H, W] bool by `steps` texels (mean of filled
    neighbours), so bilinear lookups and mipmaps at chart borders do not pick up the gap colour."""
    img = (image * filled[..., None]).permute(2, 0, 1)[None]
    m = filled.float()[None, None]
    kernel = torch.ones(1, 1, 3, 3)
    for _ in range(steps):
        s = F.conv2d(img, kernel.expand(3, 1, 3, 3), padding=1, groups=3)
        n = F.conv2d(m, kernel, padding=1)
        grow = (m == 0) & (n > 0)
        img = torch.where(grow, s / n.clamp_min(1), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0), m[0, 0] > 0


def bake_texture(mesh: trimesh.Trimesh, color_fn: ColorFn, size: int = 1024, chunk: int = 65536,
                 padding: int = 4, device: torch.device | str | None = None,
                 progress: bool = True) -> trimesh.Trimesh:
    """A copy of `mesh` with xatlas UVs and a size x size texture of color_fn on the surface.

    Vertices are split along UV seams (xatlas' vmapping). Each texel centre inside a UV
    triangle gets color_fn at the interpolated 3D position and normal; colours are then
    dilated `padding` texels past chart borders. The material is a trimesh SimpleMaterial
    with a white diffuse factor, which .glb (as PBR baseColorTexture) and .obj (.mtl map_Kd)
    both carry. xatlas dominates the cost: ~5 s for 10k faces, ~90 s for 100k (a 192^3 export)
    on the shared 2-core CPU machine.
    """
    import xatlas
    from PIL import Image

    if len(mesh.faces) == 0:
        raise Nova3DError("texture bake: the mesh has no faces")
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = size, padding, True
    atlas.generate(xatlas.ChartOptions(), pack)
    if atlas.atlas_count != 1:  # uv of several pages would overlap in one image
        raise Nova3DError(f"texture bake: xatlas made {atlas.atlas_count} atlas pages for one texture")
    vmapping, faces, uv = atlas[0]
    verts = torch.as_tensor(np.asarray(mesh.vertices)[vmapping], dtype=torch.float32)
    normals = torch.as_tensor(np.asarray(mesh.vertex_normals)[vmapping], dtype=torch.float32)
    faces_t = torch.as_tensor(faces.astype(np.int64))
    uv_t = torch.as_tensor(uv, dtype=torch.float32)
    # Texel space: x = u * size, y = (1 - v) * size (image rows grow downwards, v upwards).
    tri = torch.stack([uv_t[:, 0] * size, (1 - uv_t[:, 1]) * size], -1)[faces_t]
    face, texel, bary = _raster_uv(tri, size)
    pos = (verts[faces_t[face]] * bary[..., None]).sum(1)
    nrm = F.normalize((normals[faces_t[face]] * bary[..., None]).sum(1), dim=-1)
    rgb = _chunked(color_fn, [pos, nrm], chunk, _device_of(color_fn, device), "texture", progress)
    image = torch.zeros(size * size, 3)
    image[texel] = rgb.reshape(-1, 3).clamp(0, 1)
    filled = torch.zeros(size * size, dtype=torch.bool)
    filled[texel] = True
    image, filled = _dilate(image.reshape(size, size, 3), filled.reshape(size, size), 2 * padding)
    image[~filled] = image[filled].mean(0) if filled.any() else 0.5  # gaps: a neutral colour
    material = trimesh.visual.material.SimpleMaterial(
        image=Image.fromarray(_to_uint8(image)), diffuse=[255, 255, 255, 255], ambient=[255, 255, 255, 255],
        specular=[0, 0, 0, 255], name="nova3d_texture")
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(verts.double().numpy(), faces.astype(np.int64), visual=visual, process=False)


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup: image [H, W, C] uint8, uv [N, 2] (v up, pixel-edge texels) ->
    [N, C] float in [0, 1]."""
    tex = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    uv_t = torch.as_tensor(np.asarray(uv), dtype=torch.float32)
    grid = torch.stack([uv_t[:, 0] * 2 - 1, (1 - uv_t[:, 1]) * 2 - 1], -1)[None, None]
    out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T.numpy()


def texture_to_vertex_colors(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy whose visual is vertex colours sampled (bilinearly) from its UV texture."""
    image = np.asarray(mesh.visual.material.image.convert("RGB"))
    rgb = torch.as_tensor(sample_texture(image, mesh.visual.uv))
    rgba = np.concatenate([_to_uint8(rgb), np.full((len(rgb), 1), 255, np.uint8)], axis=1)
    out = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=rgba)
    return out


def _is_textured(mesh: trimesh.Trimesh) -> bool:
    return (mesh.visual.kind == "texture" and getattr(mesh.visual, "uv", None) is not None
            and getattr(mesh.visual.material, "image", None) is not None)


def export_mesh(mesh: trimesh.Trimesh, out_dir: str | os.PathLike, stem: str = "mesh",
                formats: list[str] | tuple[str, ...] = MESH_FORMATS) -> dict[str, Path]:
    """Write `mesh` (world frame) as out_dir/<stem>.<fmt> for each format; returns {fmt: path}.

    nova3d.mesh_io.save_mesh writes each file atomically in its format's axis convention
    (.glb/.obj Y-up, so viewers and Blender show the object upright; .ply as stored). .glb
    carries vertex colours or the texture (PBR baseColorTexture); .obj carries vertex colours
    ("v x y z r g b") or <stem>.mtl + the texture PNG beside it (written before the .obj);
    .ply always carries vertex colours (a textured mesh's texture is sampled at its vertices).
    """
    bad = [f for f in formats if f not in MESH_FORMATS]
    if bad:
        raise Nova3DError(f"mesh export: unknown format(s) {bad}; expected some of {list(MESH_FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    textured = _is_textured(mesh)
    paths: dict[str, Path] = {}
    for fmt in formats:
        out = texture_to_vertex_colors(mesh) if fmt == "ply" and textured else mesh
        paths[fmt] = save_mesh(out, out_dir / f"{stem}.{fmt}")
    return paths
