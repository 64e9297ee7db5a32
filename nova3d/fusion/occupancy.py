"""A binary occupancy grid over the field's cube, refreshed from the SDF to skip empty space.

A cell is occupied when a NeuS sample inside it could get a non-negligible alpha: the
alpha estimate of instant-nsr-pl's `occ_eval_fn` (a sample of `step_size` heading straight
into the surface) evaluated at the smallest |sdf| the cell can hold, |sdf(centre)| minus the
half cell diagonal (the SDF is ~1-Lipschitz). Using |sdf| keeps a band on both sides of the
surface and drops the deep interior that rays never reach with any transmittance left
(instant-nsr-pl keeps the interior). The result is dilated by a cell so the surface can
move between updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class OccupancyConfig:
    resolution: int = 64  # cells per axis; 128 on a GPU, 64 keeps the CPU update ~1 s
    update_every: int = 16  # training steps between refreshes (and at step 0)
    alpha_threshold: float = 0.01  # instant-nsr-pl's grid_prune_occ_thre
    dilate: int = 1  # cells added around every occupied cell
    chunk: int = 65536  # points per SDF evaluation


class OccupancyGrid(nn.Module):
    """Occupancy of the cube [-bound, bound]^3 in `resolution`^3 cells; all occupied until updated."""

    def __init__(self, bound: float, cfg: OccupancyConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or OccupancyConfig()
        self.bound = bound
        R = cfg.resolution
        self.register_buffer("occ", torch.ones(R, R, R, dtype=torch.bool))

    @property
    def cell_size(self) -> float:
        return 2 * self.bound / self.cfg.resolution

    @property
    def occupied_fraction(self) -> float:
        return float(self.occ.float().mean())

    def cell_centres(self) -> Tensor:
        """[R, R, R, 3] world positions of the cell centres (x, y, z index order)."""
        R = self.cfg.resolution
        c = (torch.arange(R, device=self.occ.device, dtype=torch.float32) + 0.5) * self.cell_size - self.bound
        return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1)

    def query(self, points: Tensor) -> Tensor:
        """points [..., 3] -> [...] bool: inside the cube and in an occupied cell."""
        R = self.cfg.resolution
        inside = (points.abs() <= self.bound).all(-1)
        idx = ((points + self.bound) / self.cell_size).floor().long().clamp(0, R - 1)
        return inside & self.occ[idx[..., 0], idx[..., 1], idx[..., 2]]

    @torch.no_grad()
    def update(self, sdf_fn: Callable[[Tensor], Tensor], inv_s: float, step_size: float) -> None:
        """Re-mark cells from `sdf_fn` ([P, 3] -> [P]) with the renderer's sharpness and step."""
        centres = self.cell_centres().reshape(-1, 3)
        sdf = torch.cat([sdf_fn(c) for c in centres.split(self.cfg.chunk)])
        half_diag = math.sqrt(3) / 2 * self.cell_size
        d = (sdf.abs() - half_diag).clamp_min(0.0)
        prev_cdf = torch.sigmoid((d + step_size / 2) * inv_s)
        next_cdf = torch.sigmoid((d - step_size / 2) * inv_s)
        alpha = ((prev_cdf - next_cdf) / prev_cdf).clamp(0.0, 1.0)
        occ = (alpha > self.cfg.alpha_threshold).reshape(self.occ.shape)
        if self.cfg.dilate > 0:
            k = 2 * self.cfg.dilate + 1
            occ = nn.functional.max_pool3d(occ[None, None].float(), k, stride=1, padding=self.cfg.dilate)[0, 0] > 0
        self.occ.copy_(occ)

    def maybe_update(self, step: int, sdf_fn: Callable[[Tensor], Tensor], inv_s: float,
                     step_size: float) -> bool:
        """Update when `step` is a multiple of `update_every`; returns whether it did."""
        if step % max(self.cfg.update_every, 1):
            return False
        self.update(sdf_fn, inv_s, step_size)
        return True
