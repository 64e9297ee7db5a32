"""Texture colours projected from the input views onto the exported mesh.

The colour field is a smooth function fitted from ~0.3 samples per pixel within the CPU
budget; it blurs sharp colour edges across neighbouring parts (block_tower: 26.1 dB re-rendered
vs 28.8 dB projected, docs/benchmarks.md "Fusion quality"). Projection keeps the views' own
detail: each surface point takes the weighted mean of the views that see it,

    weight_v = cos(normal, to camera v)^power * (1 - conflict_v(pixel))^conflict_power,

where visibility is a depth test against the mesh rendered from view v, grazing views
(cos < min_cos) are left out, and the learned conflict maps keep the pixels that disagree with
the other views out of the texture. Points no view sees keep the colour field's colour.
Cameras are the refined ones, so pose refinement also registers the views to the mesh.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import trimesh
from torch import Tensor

from nova3d.cameras import Cameras, project_points
from nova3d.eval.mesh_render import render_mesh

COLOR_SOURCES = ("views", "field")


@dataclass
class ViewColorConfig:
    power: float = 2.0  # cos^power: views facing the surface dominate (sharper than a plain mean)
    min_cos: float = 0.1  # grazing views smear one pixel over a long strip of surface
    # The maps rank pixels well but their values are small (c = expected error / lambda, with
    # lambda = 64 x the median error: corrupted pixels ~0.09, clean ones ~0.014 in the bench), so
    # 1 - c alone hardly moves a weight; (1 - c)^30 ~ exp(-30 c) gives corrupted pixels ~1/10 of
    # a clean one's weight (bench texture PSNR 30.67 / 31.49 / 31.73 / 31.57 dB at 1 / 10 / 30 / 100).
    conflict_power: float = 30.0
    depth_tolerance: float = 0.01  # world units (the object spans 1), + one pixel's footprint: closer = seen


class ViewProjector:
    """Projects surface points into every view; `colors(points, normals)` -> (rgb [P, 3], weight [P])."""

    def __init__(self, mesh: trimesh.Trimesh, rgb: Tensor, cameras: Cameras, conflict: Tensor | None = None,
                 cfg: ViewColorConfig | None = None):
        """rgb [V, 3, H, W], conflict [V, h, w] in [0, 1] at any resolution (or None)."""
        self.cfg = cfg or ViewColorConfig()
        self.rgb = rgb.float().cpu()
        self.conflict = None if conflict is None else conflict.float().cpu()[:, None]
        self.c2w, self.K = cameras.c2w.float().cpu(), cameras.K.float().cpu()
        self.size = (rgb.shape[-1], rgb.shape[-2])  # W, H
        self.depth = render_mesh(mesh, cameras, image_size=rgb.shape[-1]).depth  # [V, 1, H, W], 0 off the mesh

    @staticmethod
    def _sample(image: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
        """image [V, C, H, W] at normalised coordinates grid [V, P, 2] -> [V, C, P]."""
        return F.grid_sample(image, grid[:, :, None], mode=mode, align_corners=False)[..., 0]

    @torch.no_grad()
    def colors(self, points: Tensor, normals: Tensor) -> tuple[Tensor, Tensor]:
        """The weighted mean colour [P, 3] and the total weight [P] (0: no view sees the point)."""
        device = points.device
        points, normals = points.float().cpu(), normals.float().cpu()
        cfg, (W, H) = self.cfg, self.size
        pix, depth = project_points(points, self.c2w, self.K)  # [V, P, 2], [V, P]
        grid = torch.stack([pix[..., 0] / W, pix[..., 1] / H], dim=-1) * 2 - 1
        to_cam = F.normalize(self.c2w[:, None, :3, 3] - points[None], dim=-1)
        cos = (to_cam * normals[None]).sum(-1)
        # Nearest depth sample: bilinear blending across a depth edge would invent a surface. Its
        # error grows with the pixel's footprint on the surface (shadow mapping's slope bias).
        seen_depth = self._sample(self.depth, grid, "nearest")[:, 0]
        footprint = depth / self.K[:, None, 0, 0] / cos.clamp_min(cfg.min_cos)
        seen = (seen_depth > 0) & ((depth - seen_depth).abs() < cfg.depth_tolerance + footprint)
        weight = cos.clamp_min(0) ** cfg.power * (seen & (cos > cfg.min_cos) & (grid.abs() <= 1).all(-1))
        if self.conflict is not None:
            weight = weight * (1 - self._sample(self.conflict, grid)[:, 0].clamp(0, 1)) ** cfg.conflict_power
        rgb = self._sample(self.rgb, grid)  # [V, 3, P]
        total = weight.sum(0)
        mean = (rgb * weight[:, None]).sum(0) / total.clamp_min(1e-12)
        return mean.T.to(device), total.to(device)


def projected_color_fn(projector: ViewProjector, field_color_fn: Callable) -> Callable:
    """color_fn for nova3d.fusion.mesh: the views' colours where any view sees the point, else the field's."""

    def color_fn(points: Tensor, normals: Tensor) -> Tensor:
        rgb, weight = projector.colors(points, normals)
        unseen = weight == 0
        if bool(unseen.any()):  # the field only where no view sees the point (~20 % of the surface)
            rgb[unseen] = field_color_fn(points[unseen], normals[unseen]).to(rgb)
        return rgb.clamp(0, 1)

    return color_fn
