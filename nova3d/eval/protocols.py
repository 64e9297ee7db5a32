"""Named evaluation protocols: every choice that shapes a number, and the peer code it follows.

Papers disagree on how to score the same mesh (the same Wonder3D model reads CD 0.0199 / IoU 0.624
in its own paper and 0.0261 / 0.466 under another's protocol), so each protocol here is named, says
which peer file it follows, and is written whole into every summary.json. docs/evaluation.md
describes each one; `nova3d eval --list-protocols` prints this table.

  nova3d       (default; `gso` is its alias) nova3d's recommended protocol. Neither mesh is moved:
               the GT is in the frame of its own renders (data_prep.gso: unit box, input view on
               -Y), which is the frame the input image defines, and the prediction is scored as
               stored in nova3d's world frame, so a mesh 10 % too large or shifted by 0.05 is
               penalised. CD from 100k surface samples of the whole surface, IoU 64³ on the pair's
               union box (6-ray vote: open meshes fill correctly, nothing is clipped), SSIM with a
               fixed data range 1 and no border crop, appearance on re-renders of the mesh.
  syncdreamer  SyncDreamer's eval_mesh.py / eval_nvs.py: GT-only normalisation (norm_coords), depth-
               rendered CD at its 16 cameras (elevation 30°, f = 280 px at 256², radius 1.5),
               voxel-down-sampled at 0.01; IoU 64³ on mesh2sdf's [-1, 1]³ node grid with one ray per
               voxel; SSIM as torchmetrics computed it in 2023 (range inferred per image, 5-px border
               cropped); PSNR/SSIM/LPIPS on the GENERATED views.
  eschernet    EscherNet's metrics/eval_3D_GSO.py: BOTH meshes normalised into the unit box, CD on
               mesh vertices, IoU as syncdreamer's. Forgives scale and placement by design.
  aligned      Wonder3D++-style "aligned" numbers: both unit-boxed, then rigid ICP of the prediction
               onto the GT (no peer script found; follows the papers' description).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from nova3d.errors import Nova3DError

NORMALIZATIONS = ("gt_only", "unit_box", "keep", "input_view")
PRED_FRAMES = ("nova3d", "syncdreamer")  # nova3d.eval.normalize.FRAME_TO_NOVA3D
CHAMFER_SAMPLINGS = ("surface", "depth", "vertices")
DEPTH_CAMERAS = ("gt", "protocol")
IOU_GRIDS = ("union_bbox", "unit_box", "mesh2sdf")
IOU_INSIDE = ("vote6", "single_ray_x")
SSIM_VARIANTS = ("torchmetrics", "torchmetrics_2023")
APPEARANCE_SOURCES = ("mesh_renders", "generated_views")
APPEARANCE_VIEWS = ("all", "novel")
SYNCDREAMER_FOV_DEG = math.degrees(2 * math.atan(128 / 280))  # f = 280 px at 256² (meta_info/camera-16.pkl)


@dataclass(frozen=True)
class EvalProtocol:
    """Every choice that shapes the numbers (all written into summary.json)."""

    name: str = "nova3d"
    reference: str = "nova3d's own protocol (docs/evaluation.md)"
    # --- frames
    normalization: str = "keep"  # NORMALIZATIONS (nova3d.eval.normalize)
    pred_frame: str = "nova3d"  # the world frame the prediction is stored in (PRED_FRAMES)
    icp: bool = False
    icp_points: int = 5_000
    icp_iterations: int = 20
    # --- the orbit: data_prep.gso renders the GT at it; depth_cameras="protocol" renders depth at it
    num_views: int | None = 16  # views the GT must have (None: whatever it has)
    image_size: int = 256
    elevation_deg: float = 0.0
    fov_deg: float = 49.1
    radius: float = 1.5
    strict_orbit: bool = False  # GT cameras must match elevation_deg / fov_deg (else a one-line error)
    # --- Chamfer distance and F-score
    chamfer: str = "surface"  # the headline CD column: CHAMFER_SAMPLINGS
    chamfer_points: int = 100_000  # surface samples per mesh
    chamfer_seed: int = 0
    chamfer_depth: bool = False  # also the depth-render CD as a second column
    depth_cameras: str = "gt"  # DEPTH_CAMERAS: the GT's cameras, or the protocol's orbit
    depth_voxel_size: float = 0.01
    fscore_threshold: float = 0.05  # 5 % of the unit box; F-score is in no peer protocol here
    # --- volume IoU
    iou_resolution: int = 64
    iou_grid: str = "union_bbox"  # IOU_GRIDS
    iou_inside: str = "vote6"  # IOU_INSIDE
    # --- appearance
    appearance: str = "mesh_renders"  # APPEARANCE_SOURCES
    appearance_views: str = "all"  # APPEARANCE_VIEWS ("novel": views 1..V-1, view 0 is the input)
    ssim: str = "torchmetrics"  # SSIM_VARIANTS
    psnr_max_db: float = 100.0  # per-view PSNR cap: identical views give 100, never inf
    lpips: bool = True  # when the backbone weights are cached (never downloaded)
    lpips_net: str = "vgg"
    render_backend: str = "auto"  # mesh_render backend for the prediction's views
    render_supersample: int = 1

    def check(self) -> "EvalProtocol":
        for field, allowed in (("normalization", NORMALIZATIONS), ("pred_frame", PRED_FRAMES),
                               ("chamfer", CHAMFER_SAMPLINGS), ("depth_cameras", DEPTH_CAMERAS),
                               ("iou_grid", IOU_GRIDS), ("iou_inside", IOU_INSIDE), ("ssim", SSIM_VARIANTS),
                               ("appearance", APPEARANCE_SOURCES), ("appearance_views", APPEARANCE_VIEWS)):
            value = getattr(self, field)
            if value not in allowed:
                raise Nova3DError(f"{field} must be one of {', '.join(allowed)}, not {value!r}")
        if self.image_size < 1 or self.chamfer_points < 1 or self.iou_resolution < 2:
            raise Nova3DError("image_size and chamfer_points must be positive, iou_resolution at least 2")
        if not (self.psnr_max_db > 0 and math.isfinite(self.psnr_max_db)):
            raise Nova3DError(f"psnr_max_db must be a positive finite number, not {self.psnr_max_db}")
        if self.depth_cameras == "protocol" and self.num_views is None:
            raise Nova3DError("depth_cameras='protocol' needs num_views (the protocol's orbit)")
        return self


NOVA3D = EvalProtocol()
SYNCDREAMER = EvalProtocol(
    name="syncdreamer",
    normalization="gt_only",
    reference="SyncDreamer eval_mesh.py (norm_coords/transform_gt, get_points_from_mesh, get_chamfer_iou) "
              "and eval_nvs.py (main), github.com/liuyuan-pal/SyncDreamer",
    elevation_deg=30.0, fov_deg=SYNCDREAMER_FOV_DEG, strict_orbit=True,
    chamfer="depth", depth_cameras="protocol",
    iou_grid="mesh2sdf", iou_inside="single_ray_x",
    appearance="generated_views", ssim="torchmetrics_2023")
ESCHERNET = EvalProtocol(
    name="eschernet",
    reference="EscherNet metrics/eval_3D_GSO.py (normalize_mesh on both, chamfer on vertices) and "
              "metrics/metrics.py (chamfer, compute_iou), github.com/kxhit/EscherNet",
    normalization="unit_box", chamfer="vertices", iou_grid="mesh2sdf", iou_inside="single_ray_x")
ALIGNED = EvalProtocol(
    name="aligned",
    reference="Wonder3D++ 'aligned' evaluation as its paper describes it (both normalised, then rigid "
              "ICP); no peer script found, see docs/evaluation.md",
    normalization="unit_box", icp=True)

# SyncDreamer's GSO evaluation split (its Table 1/2; Wonder3D and others reuse it): 30 objects by
# SyncDreamer's short names (not GSO folder ids), each with the turn about +Z, in degrees, that its
# eval_mesh.py get_gt_rotate_angle gives (0 for the 11 objects it does not name). Sources:
#   names  github.com/byeongjun-park/HarmonyView gso_evaluation.sh (object_name, NUM_OBJECTS=30) and
#          its gso-eval/<name>/model.obj folders (SyncDreamer's GT meshes, "Add gso-eval dataset");
#          github.com/liuyuan-pal/SyncDreamer issue 51 ("gso-eval-meshes.zip contains all the meshes")
#   turns  github.com/liuyuan-pal/SyncDreamer eval_mesh.py get_gt_rotate_angle / transform_gt
# Convention (syncdreamer_gt_vertices): the OBJ read as stored (GSO OBJs are Z-up), norm_coords
# (longest side 1, box centred), THEN v @ Rz(-turn).T; the input camera is on +X (SyncDreamer's frame).
# Checked against SyncDreamer's own eval_examples/chicken-gt depth renders: the turned chicken mesh
# lies 0.0022 (mean) from the back-projected depth points at -270 deg, >= 0.0038 at every other
# multiple of 22.5 deg, 0.10 if the OBJ is read Y-up instead (docs/evaluation.md). Only one short
# name's GSO id is known: chicken = CHICKEN_NESTING (SyncDreamer eval_examples/chicken-mesh/metadata.pbtxt).
SYNCDREAMER_GSO30_SOURCES = (
    "github.com/byeongjun-park/HarmonyView gso_evaluation.sh + gso-eval/<name>/model.obj",
    "github.com/liuyuan-pal/SyncDreamer eval_mesh.py get_gt_rotate_angle, transform_gt",
)
SYNCDREAMER_GSO30: dict[str, float] = {
    "alarm": 270.0, "backpack": 270.0, "bell": 0.0, "blocks": 270.0, "chicken": 270.0, "cream": 0.0,
    "elephant": 180.0, "grandfather": 270.0, "grandmother": 270.0, "hat": 0.0, "leather": 0.0,
    "lion": 270.0, "lunch_bag": 270.0, "mario": 270.0, "oil": 270.0, "school_bus1": 180.0,
    "school_bus2": 225.0, "shoe": 225.0, "shoe1": 0.0, "shoe2": 0.0, "shoe3": 0.0, "soap": 270.0,
    "sofa": -90.0, "sorter": 112.5, "sorting_board": 0.0, "stucking_cups": 0.0, "teapot": 0.0,
    "toaster": 0.0, "train": 225.0, "turtle": 225.0,
}
SYNCDREAMER_GSO_IDS = {"chicken": "CHICKEN_NESTING"}  # the only short name -> GSO folder id in their code


def syncdreamer_gt_turn(name: str) -> float:
    """SyncDreamer's turn (degrees about +Z) for a GSO object of its 30-object split; Nova3DError if
    `name` is not one of its short names."""
    if name not in SYNCDREAMER_GSO30:
        raise Nova3DError(f"{name!r} is not in SyncDreamer's GSO 30-object split "
                          f"({', '.join(SYNCDREAMER_GSO30)})")
    return SYNCDREAMER_GSO30[name]


def syncdreamer_gt_vertices(vertices, name: str):
    """A GSO mesh's vertices [N, 3] (as stored in its OBJ: Z up) in the frame of SyncDreamer's GT
    renders, as its eval_mesh.py transform_gt makes them: longest side 1 and centred (norm_coords),
    then turned by -turn about +Z. numpy float64 out; SyncDreamer's frame (input camera on +X):
    nova3d.eval.normalize.FRAME_TO_NOVA3D["syncdreamer"] turns it into nova3d's."""
    import numpy as np

    v = np.asarray(vertices, dtype=np.float64)
    v = v / float((v.max(0) - v.min(0)).max())
    v = v - (v.max(0) + v.min(0)) / 2
    a = -math.radians(syncdreamer_gt_turn(name))
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return v @ rz.T


ALIASES = {"gso": "nova3d"}  # the name every caller used before issue 17
PROTOCOLS = {p.name: p for p in (NOVA3D, SYNCDREAMER, ESCHERNET, ALIGNED)}
PROTOCOLS.update({alias: PROTOCOLS[target] for alias, target in ALIASES.items()})
DEFAULT_PROTOCOL = NOVA3D.name
SUMMARIES = {
    "nova3d": "default: meshes as stored in the GT renders' frame (scale/placement errors count), surface CD",
    "syncdreamer": "SyncDreamer's tables: depth CD at 16 cams (el. 30°), mesh2sdf IoU, 2023 SSIM, generated views",
    "eschernet": "EscherNet's eval_3D_GSO.py: both meshes unit-boxed (forgives scale/placement), vertex CD",
    "aligned": "both unit-boxed + rigid ICP before scoring (Wonder3D++'s aligned numbers)",
}


def get_protocol(name: str, **overrides) -> EvalProtocol:
    """The named protocol (or alias) with some fields changed (e.g. icp=True); Nova3DError if unknown."""
    if name not in PROTOCOLS:
        raise Nova3DError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    unknown = [k for k in overrides if k not in EvalProtocol.__dataclass_fields__]
    if unknown:
        raise Nova3DError(f"protocol {name!r} has no field {unknown[0]!r}")
    return dataclasses.replace(PROTOCOLS[name], **overrides).check()


def protocol_overrides(protocol: EvalProtocol) -> dict:
    """Fields that differ from the protocol of the same name."""
    base = PROTOCOLS.get(protocol.name)
    if base is None:
        return {"(custom protocol)": True}
    return {k: v for k, v in asdict(protocol).items() if getattr(base, k) != v}


def describe_protocols() -> str:
    """One line per protocol (`nova3d eval --list-protocols`)."""
    lines = []
    for name, proto in PROTOCOLS.items():
        if name in ALIASES:
            lines.append(f"{name:<12} alias of {ALIASES[name]} (the name used before issue 17)")
            continue
        default = " [default]" if name == DEFAULT_PROTOCOL else ""
        lines.append(f"{name:<12} {SUMMARIES[name]}{default}\n{'':<12} follows: {proto.reference}")
    return "\n".join(lines) + "\nEvery field: docs/evaluation.md; each summary.json records the protocol whole."
