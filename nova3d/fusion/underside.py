"""Cut away what hangs below the lowest surface point any view sees (and, optionally, what rises
above the highest one: export.cut_unseen_top).

Views on an elevation-0 orbit (DESIGN.md §4 "Cameras") never see an object's underside, so
nothing in the fit shapes it: the SDF keeps the visual hull there, a cone that hangs below the
object (block_tower: its flat bottom at z = -0.50 came out as a skirt down to -0.58, over a
third of the Chamfer Distance; docs/benchmarks.md "Fusion quality"). No view has evidence of
anything below the lowest point it sees, so export intersects the SDF with the half-space above
that height, sdf' = max(sdf, height - z) (world +z up, nova3d.cameras), and extracts the mesh
again. A flat bottom comes out flat; a round one loses the cap below the lowest seen point
instead, about as far off as the cone it replaces (a sphere of radius 0.5 seen from 1.5: the
cut is 0.029 above its bottom, the hull's cone reaches 0.030 below).

The top is the mirror case for objects whose upper face lies above the cameras: elevation-0 views
look up at a table's top and never see it, and the fit keeps a dome there (issue 18's table: mesh
top 0.266 against 0.208, IoU 0.28; cut on the exported mesh, 0.48). Off by default until it is
measured on both fusion benches by refitting (docs/benchmarks.md "The real set").
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import trimesh
from torch import Tensor

from nova3d.cameras import Cameras
from nova3d.eval.geometry import depth_to_points
from nova3d.eval.mesh_render import render_mesh
from nova3d.fusion.mesh import MeshExportConfig, SdfFn, clean_mesh, extract_mesh


def seen_heights(mesh: trimesh.Trimesh, cameras: Cameras, masks: Tensor) -> tuple[float, float] | None:
    """(lowest, highest) height (z) of the surface points the views see: the mesh's depth at the pixels
    inside the views' masks [V, H, W], eroded by one pixel (an edge pixel's ray may graze the fit's
    surface behind the silhouette: block_tower's cut came out 0.02 lower without it), widened by two
    pixels' footprint: the erosion and the pixel centre leave the extreme pixels 1-2 pixels inside the
    silhouette's edge, and a cut must not take what a view sees. None where no masked pixel sees the mesh."""
    masks = masks.float().cpu()
    depth = render_mesh(mesh, cameras, image_size=masks.shape[-1]).depth  # [V, 1, H, W] along the axis, 0 off the mesh
    inner = -F.max_pool2d(-masks[:, None], 3, stride=1, padding=1) > 0.5
    points = depth_to_points(depth, cameras, inner.float())
    seen = (depth > 0) & inner  # the pixels depth_to_points keeps, in its order
    fy = cameras.K[:, 1, 1].float().cpu() * masks.shape[-1] / cameras.width  # at the masks' resolution
    footprint = (depth / fy[:, None, None, None])[seen]  # one pixel's height at that depth
    if not len(points):
        return None
    return float((points[:, 2] - 2 * footprint).min()), float((points[:, 2] + 2 * footprint).max())


def lowest_seen_height(mesh: trimesh.Trimesh, cameras: Cameras, masks: Tensor) -> float | None:
    """The lowest of seen_heights (None where no view sees the mesh)."""
    heights = seen_heights(mesh, cameras, masks)
    return None if heights is None else heights[0]


def cut_below(sdf_fn: SdfFn, height: float) -> SdfFn:
    """sdf_fn intersected with the half-space z >= height."""

    def cut(points: Tensor) -> Tensor:
        return torch.maximum(sdf_fn(points), height - points[:, 2])

    return cut


def cut_above(sdf_fn: SdfFn, height: float) -> SdfFn:
    """sdf_fn intersected with the half-space z <= height."""

    def cut(points: Tensor) -> Tensor:
        return torch.maximum(sdf_fn(points), points[:, 2] - height)

    return cut


def cut_unseen(mesh: trimesh.Trimesh, sdf_fn: SdfFn, bound: float, cameras: Cameras, masks: Tensor,
               cfg: MeshExportConfig, device: torch.device | str | None = None, progress: bool = True
               ) -> tuple[trimesh.Trimesh, float | None, float | None]:
    """(mesh, bottom cut height, top cut height): the sides cfg asks to cut (cut_unseen_underside,
    cut_unseen_top) where the mesh reaches more than a grid cell past what the views see; one
    extraction for both. Heights are None where nothing was cut; the mesh is unchanged if neither."""
    heights = seen_heights(mesh, cameras, masks) if cfg.cut_unseen_underside or cfg.cut_unseen_top else None
    if heights is None:
        return mesh, None, None
    cell = 2 * bound / (cfg.resolution - 1)
    low = heights[0] if cfg.cut_unseen_underside and float(mesh.vertices[:, 2].min()) < heights[0] - cell else None
    high = heights[1] if cfg.cut_unseen_top and float(mesh.vertices[:, 2].max()) > heights[1] + cell else None
    if low is None and high is None:
        return mesh, None, None
    cut_fn = sdf_fn if low is None else cut_below(sdf_fn, low)
    cut_fn = cut_fn if high is None else cut_above(cut_fn, high)
    cut = extract_mesh(cut_fn, bound, cfg.resolution, cfg.chunk, device=device, progress=progress)
    return clean_mesh(cut, cfg.min_component_fraction), low, high


def cut_unseen_underside(mesh: trimesh.Trimesh, sdf_fn: SdfFn, bound: float, cameras: Cameras, masks: Tensor,
                         cfg: MeshExportConfig, device: torch.device | str | None = None, progress: bool = True
                         ) -> tuple[trimesh.Trimesh, float | None]:
    """(mesh, cut height), or (mesh, None) unchanged where nothing hangs a grid cell below the lowest seen point."""
    mesh, low, _ = cut_unseen(mesh, sdf_fn, bound, cameras, masks,
                              dataclasses.replace(cfg, cut_unseen_underside=True, cut_unseen_top=False), device, progress)
    return mesh, low
