"""The evaluation harness: named protocols, one object, a whole set (`nova3d eval`).

Ground truth (data_prep/gso.py writes it)::

    GT/<object_id>/            an object folder (nova3d.data.schema): rgb/ mask/ ... cameras.json meta.json
    GT/<object_id>/mesh.glb    the GT mesh in the same normalised world frame as the renders

Predictions (any method's meshes)::

    PRED/<object_id>.{glb,obj,ply}   or   PRED/<object_id>/mesh.{glb,obj,ply}   (glb preferred: keeps textures)

Meshes are read with nova3d.mesh_io.load_mesh into nova3d's world frame (nova3d.cameras: +Z up,
front -Y, input view at azimuth 0): .glb/.gltf/.obj are Y-up files turned Z-up, .ply/.stl are taken
as stored — the convention our fusion exports and data_prep/gso.py writes mesh.glb in.
`normalization` then says how the pair is put into one frame before the metrics:
  "keep"        nothing changes (both already in the world frame);
  "unit_box"    each mesh's bounding box centred and its longest side scaled to 1 (SyncDreamer's
                norm_coords; the GSO default: it removes scale/translation, keeps rotation);
  "input_view"  for methods whose meshes are expressed in the input camera's axes (x right,
                y up, z towards the viewer, centred on the object): the prediction's stored
                coordinates (no per-format turn: they already say which axis is which) are
                rotated into the world with cameras.json view 0's rotation, then both are unit-boxed.
Optional rigid ICP (off by default: it can hide real pose errors) follows. Every choice is a
field of EvalProtocol and is written into the results, with the transforms applied.
Appearance: the aligned prediction is mapped back into the GT render frame and rendered with
nova3d.eval.mesh_render at the GT cameras (unlit: the mesh's texture / vertex colours), composited
on white, and compared with the GT views composited on white (resized to `image_size` if needed).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from nova3d.atomic import MARKER, check_replaceable
from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.eval import appearance, geometry
from nova3d.eval.mesh_render import MeshData, as_mesh_data, render_mesh, resolve_backend
from nova3d.eval.normalize import Normalization, Similarity, align_pair
from nova3d.eval.results import BROKEN, MISSING, OK, EvalSummary, ObjectResult

GT_MESH = "mesh.glb"
PRED_SUFFIXES = (".glb", ".obj", ".ply")  # in order of preference
NORMALIZATIONS = ("unit_box", "keep", "input_view")
_SKIP_DIRS = {"logs", "rejected"}  # data_prep's own folders inside a GT directory


@dataclass(frozen=True)
class EvalProtocol:
    """Every choice that shapes the numbers (all written into summary.json)."""

    name: str = "gso"
    reference: str = "SyncDreamer / Wonder3D GSO evaluation family (DESIGN.md §4)"
    normalization: str = "unit_box"  # NORMALIZATIONS (module docstring)
    icp: bool = False
    icp_points: int = 5_000
    icp_iterations: int = 20
    num_views: int | None = 16  # views the GT must have (None: whatever it has)
    image_size: int = 256
    elevation_deg: float = 0.0  # what data_prep/gso.py renders the GT at
    chamfer_points: int = 100_000  # surface samples per mesh
    chamfer_seed: int = 0
    fscore_threshold: float = 0.05  # 5% of the unit box
    chamfer_depth: bool = False  # also the SyncDreamer depth-render variant
    depth_voxel_size: float = 0.01
    iou_resolution: int = 64
    iou_grid: str = "union_bbox"
    lpips: bool = True  # when the backbone weights are cached (never downloaded)
    lpips_net: str = appearance.LPIPS_NET
    render_backend: str = "auto"  # mesh_render backend for the prediction's views
    render_supersample: int = 1  # >1: box-filtered anti-aliasing (Blender filters 1.5 px; measured no closer)

    def check(self) -> "EvalProtocol":
        if self.normalization not in NORMALIZATIONS:
            raise Nova3DError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {self.normalization!r}")
        if self.image_size < 1 or self.chamfer_points < 1 or self.iou_resolution < 1:
            raise Nova3DError("image_size, chamfer_points and iou_resolution must be positive")
        return self


PROTOCOLS = {"gso": EvalProtocol()}


def get_protocol(name: str, **overrides) -> EvalProtocol:
    """The named protocol with some fields changed (e.g. icp=True); Nova3DError if unknown."""
    if name not in PROTOCOLS:
        raise Nova3DError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return dataclasses.replace(PROTOCOLS[name], **overrides).check()


def protocol_overrides(protocol: EvalProtocol) -> dict:
    """Fields that differ from the protocol of the same name."""
    base = PROTOCOLS.get(protocol.name)
    if base is None:
        return {"(custom protocol)": True}
    return {k: v for k, v in asdict(protocol).items() if getattr(base, k) != v}


# ---------------------------------------------------------------- inputs

@dataclass
class GroundTruth:
    object_id: str
    folder: Path
    cameras: Cameras
    mesh: MeshData
    views: Tensor  # [V, 3, H, W] on white, in [0, 1]


def gt_objects(gt_dir: Path, protocol: EvalProtocol | None = None) -> list[Path]:
    """The object folders of a GT directory, checked cheaply (files present, view count);
    Nova3DError naming the file if one is unusable."""
    if not gt_dir.is_dir():
        raise Nova3DError(f"{gt_dir}: ground-truth folder not found")
    folders = sorted(p for p in gt_dir.iterdir() if p.is_dir() and p.name not in _SKIP_DIRS
                     and not p.name.startswith(".") and not p.name.endswith(schema.TMP_SUFFIX))
    if not folders:
        raise Nova3DError(f"{gt_dir}: no object folders (run python -m data_prep.gso first)")
    for folder in folders:
        problems = schema.missing_files(folder)
        if problems:
            raise Nova3DError(f"{problems[0]} (ground truth)")
        if not (folder / GT_MESH).is_file():
            raise Nova3DError(f"{folder / GT_MESH} is missing (ground truth; made by data_prep.gso)")
        if protocol is not None:
            _check_views(folder, protocol)
    return folders


def _check_views(folder: Path, protocol: EvalProtocol) -> Cameras:
    try:
        cams = Cameras.load(folder / schema.CAMERAS_FILE)
    except ValueError as err:
        raise Nova3DError(f"{err} (ground truth)") from err
    if protocol.num_views is not None and len(cams) != protocol.num_views:
        raise Nova3DError(f"{folder / schema.CAMERAS_FILE}: {len(cams)} views, protocol "
                          f"{protocol.name} evaluates {protocol.num_views}")
    return cams


def load_mesh(path: Path, convert_axes: bool = True) -> MeshData:
    """A mesh file as MeshData in the world frame (convert_axes=False: coordinates as stored);
    ValueError with the reason when it cannot be used."""
    from nova3d import mesh_io

    try:
        mesh = as_mesh_data(mesh_io.load_mesh(path, convert_axes=convert_axes))
    except Exception as err:  # every loader fails its own way on a corrupt file
        first_line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"cannot read {path.name}: {type(err).__name__}: {first_line}") from err
    if len(mesh.faces) == 0:
        raise ValueError(f"{path.name} holds no faces")
    if not torch.isfinite(mesh.verts).all():
        raise ValueError(f"{path.name} has NaN/inf vertex coordinates")
    return mesh


def load_gt(folder: Path, protocol: EvalProtocol) -> GroundTruth:
    """Read a GT object folder and its mesh; Nova3DError naming the file when unusable."""
    from nova3d.data.shards import read_object_folder

    _check_views(folder, protocol)
    sample = read_object_folder(folder)  # SampleError (a Nova3DError) names the file
    cams = sample.cameras
    try:
        mesh = load_mesh(folder / GT_MESH)
    except ValueError as err:
        raise Nova3DError(f"{folder / GT_MESH}: {err} (ground truth)") from err
    rgba = torch.from_numpy(sample.rgba).float() / 255
    views = appearance.composite(rgba[:, :3], rgba[:, 3:])
    return GroundTruth(folder.name, folder, cams, mesh, views)


def find_prediction(pred_dir: Path, object_id: str) -> Path | None:
    for suffix in PRED_SUFFIXES:
        for path in (pred_dir / f"{object_id}{suffix}", pred_dir / object_id / f"mesh{suffix}"):
            if path.is_file():
                return path
    return None


def unmatched_predictions(pred_dir: Path, object_ids: set[str]) -> list[str]:
    """Mesh files in PRED that belong to no GT object (listed, not evaluated)."""
    found = [p for p in pred_dir.iterdir() if p.is_file() and p.suffix.lower() in PRED_SUFFIXES
             and p.stem not in object_ids]
    found += [p for p in pred_dir.iterdir() if p.is_dir() and p.name not in object_ids
              and any((p / f"mesh{s}").is_file() for s in PRED_SUFFIXES)]
    return sorted(p.name for p in found)


# ---------------------------------------------------------------- one object

def _colour_source(mesh: MeshData) -> str:
    if mesh.texture is not None and mesh.uv is not None:
        return "texture"
    return "vertex" if mesh.vertex_colors is not None else "face" if mesh.face_colors is not None else "none"


def _undo(tf: Similarity, verts: Tensor) -> Tensor:
    """Inverse of tf.apply on verts [N, 3]."""
    return ((verts.double() - tf.translation) @ tf.rotation / tf.scale).to(verts.dtype)


def _resize(images: Tensor, size: int) -> Tensor:
    """[V, 3, H, W] -> [V, 3, size, size] (antialiased bilinear)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _metrics(pred: MeshData, gt: GroundTruth, protocol: EvalProtocol, result: ObjectResult,
             lpips_fn, device: str, backend: str) -> None:
    """Fill result's metrics; raises ValueError/Nova3DError for a prediction that cannot be scored."""
    if protocol.normalization == "input_view":
        R0 = gt.cameras.c2w[gt.cameras.input_view, :3, :3].double()
        pred = pred.with_verts(Similarity(rotation=R0).apply(pred.verts))
    mode = Normalization.KEEP if protocol.normalization == "keep" else Normalization.UNIT_BOX
    p, g, record = align_pair(pred, gt.mesh, mode, protocol.icp, protocol.icp_points,
                              protocol.icp_iterations, protocol.chamfer_seed)
    result.alignment = record
    result.chamfer = geometry.chamfer_surface(p, g, protocol.chamfer_points, protocol.chamfer_seed,
                                              protocol.fscore_threshold, device)
    result.iou = geometry.volume_iou(p, g, protocol.iou_resolution, protocol.iou_grid)
    # Back into the frame the GT was rendered in, so the GT cameras see the prediction as aligned.
    in_gt_frame = p.with_verts(_undo(record.gt_transform, p.verts))
    if protocol.chamfer_depth:
        result.chamfer_depth = geometry.chamfer_depth(in_gt_frame, gt.mesh, gt.cameras, protocol.image_size,
                                                      protocol.depth_voxel_size, protocol.fscore_threshold,
                                                      device, backend)
    rendered = render_mesh(in_gt_frame, gt.cameras, protocol.image_size, background=1.0, backend=backend,
                           supersample=protocol.render_supersample)
    result.gt_resolution = int(gt.views.shape[-1])
    result.appearance = appearance.appearance_metrics(rendered.rgb, _resize(gt.views, protocol.image_size),
                                                      lpips=lpips_fn)


def evaluate_object(pred_mesh_path: str | Path | None, gt_folder: str | Path | GroundTruth,
                    protocol: EvalProtocol = PROTOCOLS["gso"], *, lpips_fn=None, device: str = "cpu",
                    backend: str | None = None) -> ObjectResult:
    """Score one prediction against one GT object folder.

    A missing or unusable prediction gives status MISSING/BROKEN with the reason (never raises);
    GT problems raise Nova3DError naming the file. `lpips_fn`: appearance.load_lpips()'s
    function, or None (LPIPS reported unavailable).
    """
    start = time.perf_counter()
    gt = gt_folder if isinstance(gt_folder, GroundTruth) else load_gt(Path(gt_folder), protocol)
    backend = backend or _backend(protocol, device)
    path = None if pred_mesh_path is None else Path(pred_mesh_path)
    result = ObjectResult(gt.object_id, OK, None if path is None else str(path))
    if path is None or not path.is_file():
        result.status = MISSING
        result.reason = "no prediction file" if path is None else f"{path} does not exist"
    else:
        try:
            pred = load_mesh(path, convert_axes=protocol.normalization != "input_view")
            result.pred_colour = _colour_source(pred)
            _metrics(pred, gt, protocol, result, lpips_fn, device, backend)
        except Exception as err:  # noqa: BLE001 -- listed with its type, never crashes the set
            # Degenerate predictions (no area, nothing visible, bad face indices) land here.
            result = ObjectResult(gt.object_id, BROKEN, str(path), f"{type(err).__name__}: {err}",
                                  pred_colour=result.pred_colour)
    result.seconds = time.perf_counter() - start
    return result


def _backend(protocol: EvalProtocol, device: str) -> str:
    if protocol.render_backend == "auto" and torch.device(device).type == "cpu":
        return "torch"  # a GPU machine asked to evaluate on CPU
    return resolve_backend(protocol.render_backend)


# ---------------------------------------------------------------- a set

def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("nova3d", "torch", "trimesh", "torchmetrics", "torchvision", "scipy", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def evaluate_set(pred_dir: str | Path, gt_dir: str | Path, protocol: EvalProtocol | str = "gso",
                 out_dir: str | Path | None = None, progress: bool = True, device: str = "cpu") -> EvalSummary:
    """Evaluate every GT object against its prediction; write per_object.csv, summary.json and
    summary.md into out_dir (when given; a run that evaluated no object leaves an earlier result
    there as it was). Objects without a usable prediction are listed."""
    start = time.perf_counter()
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol.check()
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise Nova3DError(f"{pred_dir}: prediction folder not found")
    folders = gt_objects(gt_dir, protocol)  # every GT problem we can see cheaply, before any work
    if out_dir is not None:
        check_replaceable(out_dir)
    backend = _backend(protocol, device)
    lpips_fn, lpips_reason = (appearance.load_lpips(protocol.lpips_net, device) if protocol.lpips
                              else (None, "LPIPS disabled by the protocol"))
    results = []
    for folder in tqdm(folders, desc="eval", unit="obj", disable=not progress):
        pred = find_prediction(pred_dir, folder.name)
        result = evaluate_object(pred, load_gt(folder, protocol), protocol, lpips_fn=lpips_fn,
                                 device=device, backend=backend)
        if pred is None:
            result.reason = (f"no prediction: looked for {folder.name}.{{glb,obj,ply}} and "
                             f"{folder.name}/mesh.{{glb,obj,ply}} in {pred_dir}")
        results.append(result)
    summary = EvalSummary(
        protocol=asdict(protocol), protocol_overrides=protocol_overrides(protocol), objects=results,
        lpips_reason=lpips_reason, versions=versions(),
        environment={"device": str(device), "render_backend": backend, "nn_backend": geometry.nn_backend(device),
                     "torch_threads": torch.get_num_threads(), "numpy": np.__version__},
        pred_dir=str(pred_dir), gt_dir=str(gt_dir),
        unmatched_predictions=unmatched_predictions(pred_dir, {f.name for f in folders}),
        seconds=time.perf_counter() - start)
    if out_dir is not None and (summary.evaluated or not (Path(out_dir) / MARKER).exists()):
        summary.write(out_dir)  # a run that evaluated nothing does not replace an earlier result
    return summary
