"""Put a predicted and a ground-truth mesh in one frame before geometry metrics.

Modes (every function returns the transform it applied, so result files can state it):
  Normalization.KEEP      meshes are already in our world frame: the input-view-relative,
                          unit-box frame of nova3d.cameras (generated meshes and GSO meshes
                          prepared by data_prep share it). Nothing is changed.
  Normalization.GT_ONLY   the GT alone is unit-boxed (SyncDreamer eval_mesh.py: `norm_coords` in
                          `transform_gt`); the prediction is scored as stored, so its scale and
                          placement errors count. On data_prep.gso's GT (already unit-boxed) this
                          is KEEP up to float rounding.
  Normalization.UNIT_BOX  each mesh separately: bounding box centred at the origin, longest
                          side scaled to 1 (EscherNet eval_3D_GSO.py `normalize_mesh` on both).
                          Removes translation and scale differences, keeps rotation.
Frames: a peer's meshes live in its own world frame. FRAME_TO_NOVA3D maps each to nova3d's
(+Z up, input camera on -Y, nova3d.cameras): SyncDreamer's input camera sits on +X (its
meta_info/camera-16.pkl: view 0 at (1.299, 0, 0.75), azimuth counter-clockwise, +Z up), so its
meshes turn by -90 deg about Z: (x, y, z) -> (y, -x, z); its view k then lands on our view k.
Optional rigid ICP (point-to-point, pred moved onto gt, a few iterations) then removes a
small residual pose error; it is off by default because it can hide real pose mistakes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from nova3d.eval.geometry import nearest_distances, sample_surface
from nova3d.eval.mesh_render import MeshData, as_mesh_data


class Normalization(str, Enum):
    KEEP = "keep"
    GT_ONLY = "gt_only"
    UNIT_BOX = "unit_box"


# Rotation [3, 3] taking a peer's world frame to nova3d's (module docstring).
FRAME_TO_NOVA3D = {
    "nova3d": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "syncdreamer": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
}


def frame_rotation(frame: str) -> Tensor:
    """[3, 3] float64 rotation from `frame`'s world axes into nova3d's; ValueError if unknown."""
    if frame not in FRAME_TO_NOVA3D:
        raise ValueError(f"unknown mesh frame {frame!r}; known: {', '.join(FRAME_TO_NOVA3D)}")
    return torch.tensor(FRAME_TO_NOVA3D[frame], dtype=torch.float64)


@dataclass(frozen=True)
class Similarity:
    """x -> scale * rotation @ x + translation."""

    scale: float = 1.0
    rotation: Tensor = field(default_factory=lambda: torch.eye(3, dtype=torch.float64))  # [3, 3]
    translation: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # [3]

    def apply(self, points: Tensor) -> Tensor:
        """[N, 3] -> [N, 3], in the points' dtype."""
        out = self.scale * points.double() @ self.rotation.T + self.translation
        return out.to(points.dtype)

    def then(self, other: "Similarity") -> "Similarity":
        """The transform that applies self, then other."""
        return Similarity(other.scale * self.scale, other.rotation @ self.rotation,
                          other.scale * other.rotation @ self.translation + other.translation)

    def to_json(self) -> dict:
        return {"scale": self.scale, "rotation": self.rotation.tolist(),
                "translation": self.translation.tolist()}


def normalize_verts(verts: Tensor, mode: Normalization | str) -> tuple[Tensor, Similarity]:
    """Apply `mode` to vertices [N, 3]; returns (new vertices [N, 3], the transform applied).
    For one mesh GT_ONLY means UNIT_BOX (align_pair leaves the prediction as it is)."""
    mode = Normalization(mode)
    if mode is Normalization.KEEP:
        return verts.clone(), Similarity()
    v = verts.double()
    vmin, vmax = v.min(0).values, v.max(0).values
    extent = float((vmax - vmin).max())
    if extent <= 0:
        raise ValueError("cannot normalise a mesh with an empty bounding box")
    tf = Similarity(1.0 / extent, torch.eye(3, dtype=torch.float64), -(vmin + vmax) / 2 / extent)
    return tf.apply(verts), tf


@dataclass(frozen=True)
class IcpResult:
    transform: Similarity  # maps source points onto the target (rigid: scale 1)
    rmse_before: float  # RMS nearest-neighbour distance source -> target
    rmse_after: float
    iterations: int  # iterations run
    converged: bool

    def to_json(self) -> dict:
        return {"transform": self.transform.to_json(), "rmse_before": self.rmse_before,
                "rmse_after": self.rmse_after, "iterations": self.iterations,
                "converged": self.converged}


def _kabsch(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation R [3, 3] and translation t [3] minimising |R src + t - dst|^2 (no reflection)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    U, _, Vh = torch.linalg.svd((src - mu_s).T @ (dst - mu_d))
    d = 1.0 if float(torch.linalg.det(Vh.T @ U.T)) >= 0 else -1.0  # flip the last axis: no mirror
    R = Vh.T @ torch.diag(torch.tensor([1.0, 1.0, d], dtype=src.dtype)) @ U.T
    return R, mu_d - R @ mu_s


def icp_rigid(source: Tensor, target: Tensor, iterations: int = 20,
              tolerance: float = 1e-7) -> IcpResult:
    """Point-to-point rigid ICP moving source [N, 3] onto target [M, 3].

    Own implementation (nearest neighbours by nova3d.eval.geometry.nearest_distances' KD-tree
    on CPU): pytorch3d's iterative_closest_point uses brute-force knn on CPU.
    Stops when the RMS error improves by less than `tolerance`.
    """
    from scipy.spatial import cKDTree

    src, dst = source.double().cpu(), target.double().cpu()
    tree = cKDTree(dst.numpy())
    R, t = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    rmse_before = float(nearest_distances(src, dst).pow(2).mean().sqrt())
    prev, converged, it = rmse_before, False, 0
    for it in range(1, iterations + 1):
        moved = src @ R.T + t
        dist, idx = tree.query(moved.numpy(), k=1)
        R_step, t_step = _kabsch(moved, dst[torch.as_tensor(idx)])
        R, t = R_step @ R, R_step @ t + t_step
        rmse = float(np.sqrt(np.mean(dist**2)))  # error before this step's update
        if prev - rmse < tolerance and it > 1:
            converged = True
            break
        prev = rmse
    rmse_after = float(nearest_distances(src @ R.T + t, dst).pow(2).mean().sqrt())
    return IcpResult(Similarity(1.0, R, t), rmse_before, rmse_after, it, converged)


@dataclass(frozen=True)
class AlignmentRecord:
    """What was done to the pair; `to_json` goes into result files."""

    mode: str
    pred_transform: Similarity  # total transform applied to the predicted mesh
    gt_transform: Similarity
    icp: IcpResult | None

    def to_json(self) -> dict:
        return {"mode": self.mode, "pred_transform": self.pred_transform.to_json(),
                "gt_transform": self.gt_transform.to_json(),
                "icp": None if self.icp is None else self.icp.to_json()}


def align_pair(pred, gt, mode: Normalization | str = Normalization.KEEP, icp: bool = False,
               icp_points: int = 5_000, icp_iterations: int = 20,
               seed: int = 0) -> tuple[MeshData, MeshData, AlignmentRecord]:
    """Normalise both meshes by `mode`, then (optionally) ICP pred onto gt using
    `icp_points` surface samples of each. Returns (pred', gt', record)."""
    mode = Normalization(mode)
    pred, gt = as_mesh_data(pred), as_mesh_data(gt)
    gt_only = mode is Normalization.GT_ONLY
    pv, pred_tf = normalize_verts(pred.verts, Normalization.KEEP if gt_only else mode)
    gv, gt_tf = normalize_verts(gt.verts, Normalization.UNIT_BOX if gt_only else mode)
    icp_result = None
    if icp:
        # One seed for both: identical meshes give identical samples, so ICP leaves them exactly alone.
        src = sample_surface(pv, pred.faces, icp_points, seed)
        dst = sample_surface(gv, gt.faces, icp_points, seed)
        icp_result = icp_rigid(src, dst, icp_iterations)
        pv = icp_result.transform.apply(pv)
        pred_tf = pred_tf.then(icp_result.transform)
    record = AlignmentRecord(mode.value, pred_tf, gt_tf, icp_result)
    return pred.with_verts(pv), gt.with_verts(gv), record
