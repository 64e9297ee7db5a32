"""Geometry metrics: Chamfer Distance, F-score and Volume IoU between two meshes.

Chamfer Distance (CD) = 1/2 (mean NN distance pred->gt + mean NN distance gt->pred), with
plain (not squared) Euclidean distances, as in SyncDreamer's eval_mesh.py. Three ways to get
the points, each named in the result:
  "vertices": the meshes' vertices as stored (EscherNet metrics/eval_3D_GSO.py: chamfer on
             mesh.vertices); depends on tessellation, kept only to reproduce its tables.
  "surface": area-weighted uniform samples on each mesh, fixed seed (same seed for both, so
             identical meshes give exactly 0).
  "depth":   SyncDreamer's protocol: depth maps rendered at the evaluation cameras,
             back-projected, then voxel-down-sampled (Open3D voxel_down_sample semantics).
             It sees only surfaces visible from the cameras, as the GSO protocol intends.
F-score uses the same NN distances at one threshold (default 0.05 = 5% of the unit box; the
value is written into the result). No peer protocol here reports it (SyncDreamer's eval_mesh.py
and EscherNet's eval_3D_GSO.py give CD and IoU only): it is nova3d's addition.
Nearest neighbours are exact: pytorch3d knn_points on CUDA, scipy's cKDTree on CPU
(pytorch3d's CPU knn is brute force, ~70 s for 100k x 100k on one core).

Volume IoU on an R^3 grid of points (R = 64), two inside tests (the protocol names one):
  "vote6"         ray-parity voting: along +-x, +-y, +-z from each grid point, count surface
                  crossings; each of the 6 rays votes "inside" on an odd count; inside with a strict
                  majority (>= 4 votes). For a closed mesh all 6 agree (= exact parity test); a mesh
                  with a hole (a box with one face missing) fools only the rays that leave through
                  the hole, so it still fills correctly.
  "single_ray_x"  parity of the crossings met by ONE ray along +x from outside the grid: what
                  mesh2sdf.compute(..., fix=False) does (its core is SDFGen's makelevelset3, which
                  counts crossings along the grid's first axis), as SyncDreamer's eval_mesh.py and
                  EscherNet's metrics.py call it. Exact for closed meshes; a hole facing +x leaves
                  every grid point behind it "inside" up to the grid's end (tested).
Grids ("grid"): "union_bbox" a cube around the pair's union bounding box (voxel centres, nothing
clipped); "unit_box" voxel centres of [-0.5, 0.5]^3; "mesh2sdf" mesh2sdf's grid, R nodes from -1
to 1 inclusive (spacing 2/(R-1)): on unit-box objects only ~R/2 nodes span the object. A fixed
grid cannot see what lies outside it: the result records, per mesh, the share of vertices outside
the grid (`pred_outside_grid`, `gt_outside_grid`) and the summary warns when it is not 0.
trimesh's `contains` needs watertight meshes; generalised winding numbers cost O(voxels x faces)
without a hierarchy. Crossings are found per grid column (a scan-line voxeliser), so the cost is
O(faces + R^3). Columns are offset by a tiny fixed amount so rays never hit a mesh edge or vertex
exactly (grid-aligned meshes such as cubes would otherwise double-count).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from nova3d.cameras import Cameras, convert_c2w, scale_intrinsics
from nova3d.eval.mesh_render import MeshData, as_mesh_data, render_mesh

GridBounds = Literal["union_bbox", "unit_box", "mesh2sdf"]
InsideTest = Literal["vote6", "single_ray_x"]
IOU_METHODS = {"vote6": "ray_parity_vote_6", "single_ray_x": "ray_parity_single_x (mesh2sdf fix=False)"}
IOU_METHOD = IOU_METHODS["vote6"]
# Sub-voxel offsets of the ray columns (fractions of a voxel), generic on purpose.
_COLUMN_JITTER = np.array([1.3e-4, 2.9e-4, 4.7e-4])


# ---------------------------------------------------------------- points and distances

def sample_surface(verts: Tensor, faces: Tensor, num_points: int, seed: int = 0) -> Tensor:
    """[num_points, 3] points uniform on the surface (faces chosen by area), fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    v = verts.detach().double().cpu()[faces.cpu()]  # [F, 3, 3]
    area = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], dim=-1).norm(dim=-1)
    if not torch.isfinite(area).all() or area.sum() <= 0:
        raise ValueError("mesh has no surface area to sample")
    idx = torch.multinomial(area, num_points, replacement=True, generator=gen)
    r1, r2 = torch.rand(2, num_points, 1, generator=gen, dtype=torch.float64)
    s = r1.sqrt()  # uniform barycentrics via the square-root trick
    tri = v[idx]
    pts = (1 - s) * tri[:, 0] + s * (1 - r2) * tri[:, 1] + s * r2 * tri[:, 2]
    return pts.float()


def nearest_distances(src: Tensor, dst: Tensor) -> Tensor:
    """[N] Euclidean distance from each point of src [N, 3] to its nearest point in dst [M, 3]."""
    if src.is_cuda:
        from pytorch3d.ops import knn_points

        d2 = knn_points(src[None].float(), dst[None].float().to(src.device), K=1).dists[0, :, 0]
        return d2.clamp_min(0).sqrt()
    from scipy.spatial import cKDTree

    d, _ = cKDTree(dst.detach().double().numpy()).query(src.detach().double().numpy(), k=1)
    return torch.as_tensor(d, dtype=torch.float32)


def nn_backend(device: torch.device | str) -> str:
    return "pytorch3d.knn_points" if torch.device(device).type == "cuda" else "scipy.cKDTree"


@dataclass(frozen=True)
class ChamferResult:
    chamfer: float  # 1/2 (accuracy + completeness)
    accuracy: float  # mean NN distance pred -> gt
    completeness: float  # mean NN distance gt -> pred
    fscore: float  # harmonic mean of precision and recall at `threshold`
    precision: float  # share of pred points within threshold of gt
    recall: float  # share of gt points within threshold of pred
    threshold: float
    num_points_pred: int
    num_points_gt: int
    sampling: str  # "surface" | "depth" | "points"
    seed: int | None
    voxel_size: float | None
    nn_backend: str

    def to_json(self) -> dict:
        return asdict(self)


def point_metrics(pred: Tensor, gt: Tensor, threshold: float = 0.05, *, sampling: str = "points",
                  seed: int | None = None, voxel_size: float | None = None) -> ChamferResult:
    """CD and F-score between point sets pred [N, 3] and gt [M, 3] (same units as threshold)."""
    if len(pred) == 0 or len(gt) == 0:
        raise ValueError(f"empty point set (pred {len(pred)}, gt {len(gt)} points)")
    d_pred = nearest_distances(pred, gt)
    d_gt = nearest_distances(gt, pred)
    acc, comp = float(d_pred.mean()), float(d_gt.mean())
    precision = float((d_pred < threshold).float().mean())
    recall = float((d_gt < threshold).float().mean())
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return ChamferResult(0.5 * (acc + comp), acc, comp, fscore, precision, recall, threshold,
                         len(pred), len(gt), sampling, seed, voxel_size, nn_backend(pred.device))


def chamfer_surface(pred, gt, num_points: int = 100_000, seed: int = 0,
                    threshold: float = 0.05, device: str = "cpu") -> ChamferResult:
    """CD/F-score from `num_points` uniform surface samples on each mesh (MeshData or trimesh)."""
    pred, gt = as_mesh_data(pred), as_mesh_data(gt)
    p = sample_surface(pred.verts, pred.faces, num_points, seed).to(device)
    g = sample_surface(gt.verts, gt.faces, num_points, seed).to(device)
    return point_metrics(p, g, threshold, sampling="surface", seed=seed)


def chamfer_vertices(pred, gt, threshold: float = 0.05, device: str = "cpu") -> ChamferResult:
    """CD/F-score between the meshes' stored vertices (EscherNet's eval_3D_GSO.py)."""
    pred, gt = as_mesh_data(pred), as_mesh_data(gt)
    return point_metrics(pred.verts.float().to(device), gt.verts.float().to(device), threshold,
                         sampling="vertices")


def depth_to_points(depth: Tensor, cameras: Cameras, mask: Tensor | None = None) -> Tensor:
    """World points [N, 3] back-projected from depth [V, 1, H, W] (along each camera's axis)
    through pixel centres; pixels with depth <= 0 or mask <= 0.5 are skipped."""
    V, _, H, W = depth.shape
    K = scale_intrinsics(cameras.K.float(), W / cameras.width)
    c2w = convert_c2w(cameras.c2w.float(), "opengl", "opencv")
    j, i = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    z = depth[:, 0]
    keep = z > 0 if mask is None else (z > 0) & (mask[:, 0] > 0.5)
    x = (i - K[:, 0, 2, None, None]) / K[:, 0, 0, None, None] * z
    y = (j - K[:, 1, 2, None, None]) / K[:, 1, 1, None, None] * z
    cam = torch.stack([x, y, z], dim=-1)  # OpenCV camera axes
    world = torch.einsum("vij,vhwj->vhwi", c2w[:, :3, :3], cam) + c2w[:, None, None, :3, 3]
    return world[keep]


def voxel_downsample(points: Tensor, voxel_size: float) -> Tensor:
    """[M, 3] centroids of the points in each occupied voxel (Open3D voxel_down_sample:
    voxels anchored at min(points) - voxel_size / 2)."""
    origin = points.min(0).values - voxel_size / 2
    keys = torch.floor((points - origin) / voxel_size).long()
    # One int64 per voxel, row-major: same order as unique(keys, dim=0), ~100x faster on CPU.
    span = keys.max(0).values + 1
    flat = (keys[:, 0] * span[1] + keys[:, 1]) * span[2] + keys[:, 2]
    _, inverse = torch.unique(flat, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, 3, dtype=torch.float64).index_add_(0, inverse, points.double())
    counts = torch.bincount(inverse).double()[:, None]
    return (sums / counts).float()


def chamfer_depth(pred, gt, cameras: Cameras, image_size: int = 256, voxel_size: float = 0.01,
                  threshold: float = 0.05, device: str = "cpu", backend: str = "auto") -> ChamferResult:
    """SyncDreamer-style CD: points from depth maps of both meshes rendered at `cameras`
    (mesh_render backend `backend`), voxel-down-sampled with `voxel_size` (SyncDreamer: 0.01
    on unit-box objects)."""
    clouds = []
    for mesh in (pred, gt):
        out = render_mesh(mesh, cameras, image_size=image_size, backend=backend)
        pts = depth_to_points(out.depth, cameras, out.mask)
        if len(pts) == 0:
            raise ValueError("a mesh is not visible from any evaluation camera")
        clouds.append(voxel_downsample(pts, voxel_size).to(device))
    return point_metrics(clouds[0], clouds[1], threshold, sampling="depth", voxel_size=voxel_size)


# ---------------------------------------------------------------- volume IoU

def _edge(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Twice the signed area of the 2D triangles (u, v, w), each [N, 2]."""
    return (v[:, 0] - u[:, 0]) * (w[:, 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (w[:, 0] - u[:, 0])


def _crossing_counts(tris: np.ndarray, axis: int, lo: np.ndarray, h: float, R: int,
                     chunk: int = 2_000_000) -> np.ndarray:
    """[R, R, R + 1] for rays along `axis` through the columns of the other two axes:
    counts[a, b, s] = crossings of column (a, b) whose depth lies between voxel centres
    s - 1 and s (s = 0: before the first centre, s = R: after the last)."""
    b_ax, c_ax = [k for k in range(3) if k != axis]
    jitter = _COLUMN_JITTER[[b_ax, c_ax]] * h
    P = tris[:, :, [b_ax, c_ax]]  # [F, 3, 2] triangles projected on the column plane
    depth = tris[:, :, axis]
    # Column (a, b) sits at lo + ((a, b) + 0.5) h + jitter; columns under each triangle's bbox.
    g = (P - lo[[b_ax, c_ax]] - jitter) / h - 0.5
    i0 = np.clip(np.ceil(g.min(1)), 0, R).astype(np.int64)  # [F, 2]
    n = np.clip(np.clip(np.floor(g.max(1)), -1, R - 1).astype(np.int64) - i0 + 1, 0, None)
    per_tri = n[:, 0] * n[:, 1]
    cum = np.cumsum(per_tri)
    first = cum - per_tri  # offset of each triangle's first (triangle, column) pair
    counts = np.zeros(R * R * (R + 1), dtype=np.int64)
    start = 0
    while start < len(tris):  # chunks of <= `chunk` (triangle, column) pairs bound memory
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + chunk, side="right")))
        t = np.repeat(np.arange(start, stop), per_tri[start:stop])
        start = stop
        if len(t) == 0:
            continue
        k = np.arange(len(t)) + base - first[t]  # index of the pair within its triangle
        a = i0[t, 0] + k // n[t, 1]
        b = i0[t, 1] + k % n[t, 1]
        q = np.stack([lo[b_ax] + (a + 0.5) * h + jitter[0], lo[c_ax] + (b + 0.5) * h + jitter[1]], -1)
        p0, p1, p2 = P[t, 0], P[t, 1], P[t, 2]
        area = _edge(p0, p1, p2)
        ok = np.abs(area) > 1e-18  # edge-on triangles are parallel to the ray: no crossing
        inv = 1.0 / np.where(ok, area, 1.0)
        w0, w1, w2 = _edge(p1, p2, q) * inv, _edge(p2, p0, q) * inv, _edge(p0, p1, q) * inv
        hit = ok & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        d = (w0 * depth[t, 0] + w1 * depth[t, 1] + w2 * depth[t, 2])[hit]
        s = np.clip(np.floor((d - lo[axis]) / h - 0.5) + 1, 0, R).astype(np.int64)
        counts += np.bincount((a[hit] * R + b[hit]) * (R + 1) + s, minlength=counts.size)
    return counts.reshape(R, R, R + 1)


def occupancy_grid(verts: Tensor, faces: Tensor, lo: Tensor, size: float, resolution: int = 64,
                   inside: InsideTest = "vote6") -> Tensor:
    """Bool [R, R, R] (x, y, z index order): voxel centres of the cube [lo, lo + size]^3 inside
    the mesh by `inside` (module docstring: "vote6" is fine with non-watertight meshes)."""
    R = resolution
    tris = verts.detach().double().cpu().numpy()[faces.cpu().numpy()]
    lo_np, h = np.asarray(lo, dtype=np.float64).reshape(3), size / R
    if inside == "single_ray_x":
        below = np.cumsum(_crossing_counts(tris, 0, lo_np, h, R)[..., :R], axis=-1)  # [y, z, x]
        return torch.from_numpy(np.moveaxis(below % 2 == 1, -1, 0).copy())
    if inside != "vote6":
        raise ValueError(f"unknown inside test {inside!r}; expected 'vote6' or 'single_ray_x'")
    votes = np.zeros((R, R, R), dtype=np.int64)
    for axis in range(3):
        counts = _crossing_counts(tris, axis, lo_np, h, R)
        below = np.cumsum(counts[..., :R], axis=-1)  # crossings before each voxel centre
        above = counts.sum(-1, keepdims=True) - below
        v = below % 2 + above % 2  # [R(b), R(c), R(axis)]
        votes += np.moveaxis(v, -1, axis)
    return torch.from_numpy(votes >= 4)


@dataclass(frozen=True)
class VolumeIoUResult:
    iou: float
    resolution: int
    grid: str  # "union_bbox" | "unit_box"
    grid_min: tuple[float, float, float]
    grid_size: float  # side of the cubic grid
    method: str
    occupied_pred: int  # voxels inside pred
    occupied_gt: int
    pred_outside_grid: float = 0.0  # share of the prediction's vertices outside the grid (not seen)
    gt_outside_grid: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def grid_cube(meshes: list[MeshData], grid: GridBounds, resolution: int = 64) -> tuple[Tensor, float]:
    """(min corner [3], side) of the cubic evaluation grid whose R voxel centres are sampled: the
    unit box [-0.5, 0.5]^3; mesh2sdf's R nodes spanning [-1, 1] inclusive; or a cube around the
    union bounding box (side = its longest extent, so voxels stay isotropic)."""
    if grid == "unit_box":
        return torch.full((3,), -0.5, dtype=torch.float64), 1.0
    if grid == "mesh2sdf":
        h = 2.0 / (resolution - 1)
        return torch.full((3,), -1.0 - h / 2, dtype=torch.float64), resolution * h
    if grid != "union_bbox":
        raise ValueError(f"unknown IoU grid {grid!r}; expected 'union_bbox', 'unit_box' or 'mesh2sdf'")
    pts = torch.cat([m.verts.double().cpu()[m.faces.unique().cpu()] for m in meshes])
    vmin, vmax = pts.min(0).values, pts.max(0).values
    size = float((vmax - vmin).max())
    if size <= 0:
        raise ValueError("meshes have an empty bounding box")
    return (vmin + vmax) / 2 - size / 2, size


def outside_share(mesh: MeshData, lo: Tensor, size: float) -> float:
    """Share of the mesh's (referenced) vertices outside the cube [lo, lo + size]^3."""
    v = mesh.verts.double().cpu()[mesh.faces.unique().cpu()]
    out = ((v < lo) | (v > lo + size)).any(-1)
    return float(out.double().mean())


def volume_iou(pred, gt, resolution: int = 64, grid: GridBounds = "union_bbox",
               inside: InsideTest = "vote6") -> VolumeIoUResult:
    """Volume IoU of two meshes (MeshData or trimesh) on a resolution^3 grid (module docstring)."""
    pred, gt = as_mesh_data(pred), as_mesh_data(gt)
    lo, size = grid_cube([pred, gt], grid, resolution)
    occ_p = occupancy_grid(pred.verts, pred.faces, lo, size, resolution, inside)
    occ_g = occupancy_grid(gt.verts, gt.faces, lo, size, resolution, inside)
    union = int((occ_p | occ_g).sum())
    iou = float((occ_p & occ_g).sum()) / union if union else float("nan")
    return VolumeIoUResult(iou, resolution, grid, tuple(float(x) for x in lo), float(size),
                           IOU_METHODS[inside], int(occ_p.sum()), int(occ_g.sum()),
                           outside_share(pred, lo, size), outside_share(gt, lo, size))
