"""The evaluation harness: one object, a whole set (`nova3d eval`), under a named protocol.

The protocols themselves (nova3d.eval.protocols: `nova3d`, the default, with its alias `gso`;
`syncdreamer`; `eschernet`; `aligned`) and docs/evaluation.md say what each choice means and
which peer file it follows; nova3d.eval.scoring does the frames and the geometry metrics.

Ground truth (data_prep/gso.py writes it, at the protocol's orbit)::

    GT/<object_id>/            an object folder (nova3d.data.schema): rgb/ mask/ ... cameras.json meta.json
    GT/<object_id>/mesh.glb    the GT mesh in the same normalised world frame as the renders

Predictions (any method's meshes)::

    PRED/<object_id>.{glb,obj,ply}   or   PRED/<object_id>/mesh.{glb,obj,ply}   (glb preferred: keeps textures)
    VIEWS/<object_id>/         the generated views (protocols with appearance="generated_views"):
                               an object folder from `nova3d generate`, or 000.png ... 015.png

Meshes are read with nova3d.mesh_io.load_mesh into nova3d's world frame (nova3d.cameras: +Z up,
front -Y, input view at azimuth 0): .glb/.gltf/.obj are Y-up files turned Z-up, .ply/.stl are taken
as stored — the convention our fusion exports and data_prep/gso.py writes mesh.glb in. A peer's
meshes are then turned from its world frame by `pred_frame` (SyncDreamer's: input camera on +X).
Appearance: with "mesh_renders" the aligned prediction is mapped back into the GT render frame and
rendered with nova3d.eval.mesh_render at the GT cameras (unlit: texture / vertex colours) on white;
with "generated_views" the method's generated views are compared instead (what SyncDreamer's and
Wonder3D's novel-view tables report). Both against the GT views on white at `image_size`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from nova3d.atomic import MARKER, check_replaceable
from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.eval import appearance, geometry
from nova3d.eval.mesh_render import MeshData, as_mesh_data, render_mesh, resolve_backend
from nova3d.eval.protocols import (ALIASES, DEFAULT_PROTOCOL, NORMALIZATIONS, PROTOCOLS, EvalProtocol,  # noqa: F401
                                   get_protocol, protocol_overrides)
from nova3d.eval.results import BROKEN, MISSING, OK, EvalSummary, ObjectResult
from nova3d.eval.scoring import compared_views, find_generated_views, load_generated_views, resize, score_geometry, undo

GT_MESH = "mesh.glb"
PRED_SUFFIXES = (".glb", ".obj", ".ply")  # in order of preference
_SKIP_DIRS = {"logs", "rejected"}  # data_prep's own folders inside a GT directory
_undo, _resize = undo, resize  # kept for older imports


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
    if protocol.strict_orbit:
        el = cams.elevation_deg.float()
        if float((el - protocol.elevation_deg).abs().max()) > 0.5 or abs(cams.fov_deg - protocol.fov_deg) > 0.1:
            raise Nova3DError(f"{folder / schema.CAMERAS_FILE}: views at elevation {float(el.min()):g}..{float(el.max()):g}°, "
                              f"FOV {cams.fov_deg:.2f}°; protocol {protocol.name} needs {protocol.elevation_deg:g}°, "
                              f"FOV {protocol.fov_deg:.2f}° (python -m data_prep.gso --protocol {protocol.name})")
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


def _metrics(pred: MeshData, gt: GroundTruth, protocol: EvalProtocol, result: ObjectResult,
             lpips_fn, device: str, backend: str, views_dir: Path | None) -> None:
    """Fill result's metrics; raises ValueError/Nova3DError for a prediction that cannot be scored."""
    scores = score_geometry(pred, gt.mesh, protocol, gt_cameras=gt.cameras, device=device, backend=backend)
    result.alignment, result.chamfer, result.chamfer_depth, result.iou = (
        scores.alignment, scores.chamfer, scores.chamfer_depth, scores.iou)
    result.gt_resolution = int(gt.views.shape[-1])
    result.appearance_source = protocol.appearance
    if protocol.appearance == "generated_views":
        folder = None if views_dir is None else find_generated_views(views_dir, gt.object_id)
        if folder is None:
            result.appearance_reason = ("no generated views (give --views DIR)" if views_dir is None
                                        else f"no generated views: {views_dir / gt.object_id} not found")
            return
        try:
            images = load_generated_views(folder, gt.cameras, protocol.image_size)
        except (ValueError, OSError) as err:
            result.appearance_reason = str(err)
            return
    else:
        images = render_mesh(scores.pred_in_gt_frame, gt.cameras, protocol.image_size, background=1.0,
                             backend=backend, supersample=protocol.render_supersample).rgb
    result.appearance = appearance.appearance_metrics(
        images, resize(gt.views, protocol.image_size), lpips=lpips_fn, ssim_variant=protocol.ssim,
        psnr_max_db=protocol.psnr_max_db, views=compared_views(protocol, len(gt.cameras)))


def evaluate_object(pred_mesh_path: str | Path | None, gt_folder: str | Path | GroundTruth,
                    protocol: EvalProtocol = PROTOCOLS[DEFAULT_PROTOCOL], *, lpips_fn=None, device: str = "cpu",
                    backend: str | None = None, views_dir: str | Path | None = None) -> ObjectResult:
    """Score one prediction against one GT object folder.

    A missing or unusable prediction gives status MISSING/BROKEN with the reason (never raises);
    GT problems raise Nova3DError naming the file. `lpips_fn`: appearance.load_lpips()'s
    function, or None (LPIPS reported unavailable). `views_dir`: VIEWS/ of the module docstring
    (protocols scoring generated views; without it their appearance is reported missing).
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
            _metrics(pred, gt, protocol, result, lpips_fn, device, backend,
                     None if views_dir is None else Path(views_dir))
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


def evaluate_set(pred_dir: str | Path, gt_dir: str | Path, protocol: EvalProtocol | str = DEFAULT_PROTOCOL,
                 out_dir: str | Path | None = None, progress: bool = True, device: str = "cpu",
                 views_dir: str | Path | None = None, requested_as: str | None = None) -> EvalSummary:
    """Evaluate every GT object against its prediction; write per_object.csv, summary.json and
    summary.md into out_dir (when given; a run that evaluated no object leaves an earlier result
    there as it was). Objects without a usable prediction are listed. `views_dir`: the generated
    views, required by protocols with appearance="generated_views"."""
    start = time.perf_counter()
    requested = requested_as or (protocol if isinstance(protocol, str) else protocol.name)
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol.check()
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise Nova3DError(f"{pred_dir}: prediction folder not found")
    if protocol.appearance == "generated_views":
        if views_dir is None:
            raise Nova3DError(f"protocol {protocol.name} scores PSNR/SSIM/LPIPS on the generated views: give "
                              "--views DIR (or --appearance mesh_renders to score re-renders of the meshes)")
        if not Path(views_dir).is_dir():
            raise Nova3DError(f"--views {views_dir}: folder not found")
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
                                 device=device, backend=backend, views_dir=views_dir)
        if pred is None:
            result.reason = (f"no prediction: looked for {folder.name}.{{glb,obj,ply}} and "
                             f"{folder.name}/mesh.{{glb,obj,ply}} in {pred_dir}")
        results.append(result)
    summary = EvalSummary(
        protocol={**asdict(protocol), "requested_as": requested, "alias_of": ALIASES.get(requested)},
        protocol_overrides=protocol_overrides(protocol), objects=results,
        lpips_reason=lpips_reason, versions=versions(),
        environment={"device": str(device), "render_backend": backend, "nn_backend": geometry.nn_backend(device),
                     "torch_threads": torch.get_num_threads(), "numpy": np.__version__},
        pred_dir=str(pred_dir), gt_dir=str(gt_dir), views_dir=None if views_dir is None else str(views_dir),
        unmatched_predictions=unmatched_predictions(pred_dir, {f.name for f in folders}),
        seconds=time.perf_counter() - start)
    if out_dir is not None and (summary.evaluated or not (Path(out_dir) / MARKER).exists()):
        summary.write(out_dir)  # a run that evaluated nothing does not replace an earlier result
    return summary
