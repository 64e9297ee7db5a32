"""One prediction against one GT under a protocol: frames, geometry metrics, the views compared.

Pure scoring, no files except the generated views it is pointed at: nova3d.eval.protocol reads the
GT folders and writes results; tests/test_eval_protocols_known.py calls `score_geometry` on
analytic meshes. Order of operations (each step recorded in the result):
  1. the prediction, read into nova3d's world frame by its file format (nova3d.mesh_io), is turned
     from its method's world frame (`pred_frame`, nova3d.eval.normalize.FRAME_TO_NOVA3D);
  2. `normalization` ("input_view" first rotates it by the GT's view-0 camera), optional ICP;
  3. Chamfer (the headline by `chamfer`: surface samples, depth renders, or vertices), F-score,
     volume IoU; depth renders at the GT's cameras or the protocol's own orbit (`depth_cameras`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from nova3d.cameras import Cameras, OrbitSpec, orbit_cameras
from nova3d.eval import geometry
from nova3d.eval.geometry import ChamferResult, VolumeIoUResult
from nova3d.eval.mesh_render import MeshData, as_mesh_data
from nova3d.eval.normalize import AlignmentRecord, Normalization, Similarity, align_pair, frame_rotation
from nova3d.eval.protocols import EvalProtocol

ANGLE_TOLERANCE_DEG = 0.5  # generated views / GT cameras must agree this well


@dataclass
class GeometryScores:
    chamfer: ChamferResult  # the protocol's headline CD
    chamfer_depth: ChamferResult | None  # the depth variant as a second column (when asked)
    iou: VolumeIoUResult
    alignment: AlignmentRecord
    pred_in_gt_frame: MeshData  # the aligned prediction mapped back into the GT's render frame


def protocol_cameras(protocol: EvalProtocol) -> Cameras:
    """The protocol's own orbit (SyncDreamer: 16 views, elevation 30 deg, f = 280 px at 256²)."""
    return orbit_cameras(OrbitSpec(num_views=protocol.num_views or 16, elevation_deg=protocol.elevation_deg,
                                   radius=protocol.radius, fov_deg=protocol.fov_deg, resolution=protocol.image_size))


def undo(tf: Similarity, verts: Tensor) -> Tensor:
    """Inverse of tf.apply on verts [N, 3]."""
    return ((verts.double() - tf.translation) @ tf.rotation / tf.scale).to(verts.dtype)


def to_world(pred, protocol: EvalProtocol, input_c2w: Tensor | None = None) -> MeshData:
    """Steps 1-2a of the module docstring: the prediction in nova3d's world frame."""
    pred = as_mesh_data(pred)
    if protocol.pred_frame != "nova3d":
        pred = pred.with_verts(Similarity(rotation=frame_rotation(protocol.pred_frame)).apply(pred.verts))
    if protocol.normalization == "input_view":
        if input_c2w is None:
            raise ValueError("normalization 'input_view' needs the GT's input camera")
        pred = pred.with_verts(Similarity(rotation=input_c2w[:3, :3].double()).apply(pred.verts))
    return pred


def _mode(protocol: EvalProtocol) -> Normalization:
    return {"keep": Normalization.KEEP, "gt_only": Normalization.GT_ONLY}.get(protocol.normalization,
                                                                             Normalization.UNIT_BOX)


def score_geometry(pred, gt_mesh, protocol: EvalProtocol, *, gt_cameras: Cameras | None = None,
                   device: str = "cpu", backend: str = "torch") -> GeometryScores:
    """CD, F-score and IoU of `pred` against `gt_mesh` (MeshData or trimesh, GT in its render frame)
    under `protocol`. `gt_cameras`: the GT's views (input_view normalisation, depth_cameras="gt");
    without them the protocol's orbit stands in. Raises ValueError for an unscorable prediction."""
    gt_mesh = as_mesh_data(gt_mesh)
    cams_gt = gt_cameras if gt_cameras is not None else protocol_cameras(protocol)
    pred = to_world(pred, protocol, cams_gt.c2w[cams_gt.input_view])
    p, g, record = align_pair(pred, gt_mesh, _mode(protocol), protocol.icp, protocol.icp_points,
                              protocol.icp_iterations, protocol.chamfer_seed)
    in_gt_frame = p.with_verts(undo(record.gt_transform, p.verts))
    depth = None
    if protocol.chamfer == "depth" or protocol.chamfer_depth:
        if protocol.depth_cameras == "protocol":  # the normalised frame, as SyncDreamer renders it
            depth = geometry.chamfer_depth(p, g, protocol_cameras(protocol), protocol.image_size,
                                           protocol.depth_voxel_size, protocol.fscore_threshold, device, backend)
        else:
            depth = geometry.chamfer_depth(in_gt_frame, gt_mesh, cams_gt, protocol.image_size,
                                           protocol.depth_voxel_size, protocol.fscore_threshold, device, backend)
    if protocol.chamfer == "depth":
        headline = depth
    elif protocol.chamfer == "vertices":
        headline = geometry.chamfer_vertices(p, g, protocol.fscore_threshold, device)
    else:
        headline = geometry.chamfer_surface(p, g, protocol.chamfer_points, protocol.chamfer_seed,
                                            protocol.fscore_threshold, device)
    iou = geometry.volume_iou(p, g, protocol.iou_resolution, protocol.iou_grid, protocol.iou_inside)
    return GeometryScores(headline, depth if protocol.chamfer_depth and protocol.chamfer != "depth" else None,
                          iou, record, in_gt_frame)


# ---------------------------------------------------------------- views compared

def compared_views(protocol: EvalProtocol, num_views: int) -> list[int] | None:
    """Indices of the views the appearance metrics average (None: all of them)."""
    return None if protocol.appearance_views == "all" else list(range(1, num_views))


def resize(images: Tensor, size: int) -> Tensor:
    """[V, 3, H, W] -> [V, 3, size, size] (antialiased bilinear)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def find_generated_views(views_dir: Path, object_id: str) -> Path | None:
    folder = views_dir / object_id
    return folder if folder.is_dir() else None


def _read_on_white(path: Path) -> Tensor:
    """[3, H, W] in [0, 1]; RGBA composited on white (SyncDreamer eval_nvs.py color_map_forward)."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB"), dtype=np.float32) / 255
    rgb = torch.from_numpy(arr).permute(2, 0, 1)
    if rgb.shape[0] == 4:
        rgb = rgb[:3] * rgb[3:] + (1 - rgb[3:])
    return rgb


def load_generated_views(folder: Path, gt_cameras: Cameras, size: int) -> Tensor:
    """The generated views of one object on white, [V, 3, size, size]; ValueError when they do not
    match the GT's views. Layouts: an object folder as `nova3d generate` writes it (rgb/000.png...,
    cameras.json, checked against the GT's azimuths and elevations), or 000.png, 001.png, ... directly
    in the folder (SyncDreamer's eval_nvs.py layout; taken to be at the GT's cameras)."""
    from nova3d.data import schema

    rgb_dir = folder / schema.RGB_DIR
    cams_file = folder / schema.CAMERAS_FILE
    source = rgb_dir if rgb_dir.is_dir() else folder
    V = len(gt_cameras)
    paths = [source / schema.view_name(i) for i in range(V)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"generated views: {missing[0]} is missing ({V} views needed, like the GT's)")
    if rgb_dir.is_dir() and cams_file.is_file():
        cams = Cameras.load(cams_file)
        if len(cams) != V:
            raise ValueError(f"generated views: {cams_file} has {len(cams)} views, the GT {V}")
        for what in ("azimuth_deg", "elevation_deg"):
            diff = (getattr(cams, what) - getattr(gt_cameras, what) + 180) % 360 - 180
            if float(diff.abs().max()) > ANGLE_TOLERANCE_DEG:
                raise ValueError(f"generated views: {cams_file} {what} {getattr(cams, what).tolist()} differ from "
                                 f"the GT's {getattr(gt_cameras, what).tolist()}")
    return resize(torch.stack([_read_on_white(p) for p in paths]), size)
