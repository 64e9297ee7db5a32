"""Pose-sensitivity study (issue 5 §2): fusion quality against camera pose error, with and
without pose refinement.

    python -m nova3d.eval.pose_study --object torus_knot --out DIR [--angles 0 5 10 15] [--quick]
    python -m nova3d.eval.pose_study --gt outputs/demo/gt/torus_knot --out DIR    (no Blender render)

For each angle a, the clean render's cameras of views 1.. are each turned by exactly a degrees
(a random axis per view) and moved by a x TRANSLATION_PER_DEG of the radius (nova3d.fusion.perturb,
pose_magnitude "max", no colour corruption); the same perturbed views are fused with
`fusion/default` (pose refinement) and `fusion/no_pose_refine`, each mesh is scored with the GSO
protocol against the clean GT (CD, IoU, texture PSNR/SSIM) and the pose error left after fusion
is read from fusion's metrics.json. Written into DIR (atomically):
  pose_sensitivity.json   one entry per angle x mode (+ settings)
  pose_sensitivity.png    quality against perturbation: CD, PSNR and the pose error left, two curves each
  pose_sensitivity.md     the same numbers as a markdown table
  angle_<a>/perturbed/<object>/, angle_<a>/<mode>/<object>/   the inputs and what nova3d fuse wrote
Slow: two fusions per angle (the demo's fusion budget each, nova3d.demo.DEMO_FUSION); --quick
runs 2 angles with a tiny fusion to check the chain, not the method.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from nova3d.atomic import atomic_path, check_replaceable, mark_result, staged_dir, write_json_atomic
from nova3d.errors import Nova3DError
from nova3d.eval.plot import Panel, line_panels
from nova3d.eval.results import fmt
from nova3d.fusion.perturb import PerturbConfig

MODES = {"refine": "fusion/default", "no_refine": "fusion/no_pose_refine"}
DEFAULT_ANGLES = (0.0, 5.0, 10.0, 15.0)
QUICK_ANGLES = (0.0, 10.0)
TRANSLATION_PER_DEG = 0.01 / 3  # 1% of the radius per 3°: the demo's ratio of the two maxima
JSON_FILE, PNG_FILE, MD_FILE = "pose_sensitivity.json", "pose_sensitivity.png", "pose_sensitivity.md"


@dataclass
class PoseEntry:
    """One fusion of the study: `mode` at a perturbation of `angle_deg`."""

    angle_deg: float
    mode: str  # key of MODES
    experiment: str
    translation: float  # applied camera shift, fraction of the radius
    chamfer: float | None
    volume_iou: float | None
    psnr: float | None
    ssim: float | None
    rotation_error_deg_before: float | None  # mean over views 1.. (fusion's metrics.json)
    rotation_error_deg_after: float | None
    translation_error_before: float | None
    translation_error_after: float | None
    seconds_fit: float
    status: str = "ok"  # the eval status ("ok", "broken": reason in `reason`)
    reason: str | None = None


@dataclass
class PoseStudy:
    object_id: str
    entries: list[PoseEntry]
    json_path: Path
    png_path: Path
    md_path: Path


def check_angles(angles: Sequence[float]) -> list[float]:
    """Sorted distinct angles in [0, 180]; Nova3DError otherwise."""
    angles = [float(a) for a in angles]
    if not angles:
        raise Nova3DError("pose study: --angles needs at least one angle")
    bad = [a for a in angles if not 0 <= a <= 180]
    if bad:
        raise Nova3DError(f"pose study: angles {bad} outside [0, 180] degrees")
    if len(set(angles)) != len(angles):
        raise Nova3DError(f"pose study: angles {angles} repeat a value")
    return sorted(angles)


def _entry(angle: float, mode: str, translation: float, metrics: dict, scores: dict) -> PoseEntry:
    num = lambda x: None if x is None or not math.isfinite(float(x)) else float(x)  # noqa: E731
    return PoseEntry(angle, mode, MODES[mode], translation, num(scores["chamfer"]), num(scores["volume_iou"]),
                     num(scores["psnr"]), num(scores["ssim"]),
                     *(num(metrics.get(k)) for k in ("rotation_error_deg_before", "rotation_error_deg_after",
                                                     "translation_error_before", "translation_error_after")),
                     seconds_fit=float(metrics["seconds_fit"]), status=scores["status"], reason=scores["reason"])


def run_pose_study(gt_folder: str | Path, out: str | Path, angles: Sequence[float] = DEFAULT_ANGLES,
                   fusion_overrides: Sequence[str] | None = None, translation_per_deg: float = TRANSLATION_PER_DEG,
                   protocol=None, seed: int = 0, progress: bool = True) -> PoseStudy:
    """The study (module docstring) on a GT object folder with mesh.glb (data_prep.gso / nova3d.demo)."""
    from nova3d.demo import DEMO_FUSION
    from nova3d.fuse import load_fusion_config

    gt_folder, out = Path(gt_folder), Path(out)
    angles = check_angles(angles)
    overrides = list(DEMO_FUSION if fusion_overrides is None else fusion_overrides)
    configs = {mode: load_fusion_config(exp, overrides) for mode, exp in MODES.items()}  # bad keys fail now
    if not (gt_folder / "mesh.glb").is_file():
        raise Nova3DError(f"{gt_folder / 'mesh.glb'} is missing (ground truth; made by nova3d.demo or data_prep.gso)")
    object_id = gt_folder.name
    with staged_dir(out, "nova3d pose study") as stage:  # a failed study keeps the previous one
        if gt_folder.resolve().is_relative_to(out.resolve()):  # its GT lives in OUT: it moves with the result
            gt_folder = Path(shutil.copytree(gt_folder, stage / gt_folder.relative_to(out)))
        study = _run(gt_folder, stage, object_id, angles, overrides, configs, translation_per_deg, protocol, seed,
                     progress)
    return dataclasses.replace(study, json_path=out / JSON_FILE, png_path=out / PNG_FILE, md_path=out / MD_FILE)


def _run(gt_folder: Path, out: Path, object_id: str, angles: list[float], overrides: list[str], configs: dict,
         translation_per_deg: float, protocol, seed: int, progress: bool) -> PoseStudy:
    from nova3d.demo import score_mesh
    from nova3d.fuse import fuse_object
    from nova3d.fusion.perturb import perturb_object

    entries = []
    bar = tqdm(total=len(angles) * len(MODES), desc="pose study", unit="fusion", disable=not progress)
    for angle in angles:
        root = out / f"angle_{angle:g}"
        translation = angle * translation_per_deg
        cfg = PerturbConfig(color_views=[], pose_rotation_deg=angle, pose_translation=translation,
                            pose_magnitude="max", seed=seed)
        perturbed = root / "perturbed" / object_id
        perturb_object(gt_folder, perturbed, cfg)
        for mode in MODES:
            bar.set_postfix_str(f"{angle:g}° {mode}")
            run_dir = root / mode / object_id
            fused = fuse_object(perturbed, run_dir, configs[mode])
            result = score_mesh(fused.meshes["glb"], gt_folder, run_dir / "eval", protocol)
            scores = {**result.scalars(), "status": result.status, "reason": result.reason}
            entries.append(_entry(angle, mode, translation, fused.metrics, scores))
            bar.update()
    bar.close()
    study = PoseStudy(object_id, entries, out / JSON_FILE, out / PNG_FILE, out / MD_FILE)
    write_json_atomic(study.json_path, {"object_id": object_id, "gt_folder": str(gt_folder), "angles_deg": angles,
                                        "translation_per_deg": translation_per_deg, "modes": MODES,
                                        "fusion_overrides": overrides, "seed": seed,
                                        "entries": [dataclasses.asdict(e) for e in entries]})
    plot_study(study)
    with atomic_path(study.md_path) as tmp:
        tmp.write_text(markdown(study, overrides))
    return study


def _curves(entries: list[PoseEntry], key: str) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for mode in MODES:
        rows = [e for e in entries if e.mode == mode]
        label = "pose refinement" if mode == "refine" else "no refinement"
        out[label] = ([e.angle_deg for e in rows], [getattr(e, key) for e in rows])
    return out


def plot_study(study: PoseStudy) -> Path:
    """pose_sensitivity.png: CD, texture PSNR and the rotation error left, against the perturbation."""
    angles = sorted({e.angle_deg for e in study.entries})
    x = "camera rotation error applied (deg)"
    panels = [Panel("Chamfer distance (lower is better)", x, "CD", _curves(study.entries, "chamfer"), angles),
              Panel("Texture PSNR vs clean views (higher is better)", x, "PSNR (dB)",
                    _curves(study.entries, "psnr"), angles),
              Panel("Rotation error after fusion (lower is better)", x, "deg",
                    _curves(study.entries, "rotation_error_deg_after"), angles)]
    return line_panels(panels, f"Pose sensitivity of de-conflict fusion - {study.object_id} "
                               f"(views 1.. turned by the angle, moved by angle x {TRANSLATION_PER_DEG:.4f} radius)",
                       study.png_path)


def markdown(study: PoseStudy, overrides: Sequence[str]) -> str:
    lines = [f"## Pose sensitivity — `{study.object_id}`", "",
             f"![pose sensitivity]({study.png_path.name})", "",
             "| rotation applied | mode | CD ↓ | IoU ↑ | PSNR ↑ | SSIM ↑ | rotation error after (°) | "
             "translation error before → after | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for e in study.entries:
        lines.append(f"| {e.angle_deg:g}° | {e.mode} (`{e.experiment}`) | {fmt(e.chamfer)} | {fmt(e.volume_iou, 3)} | "
                     f"{fmt(e.psnr, 2)} | {fmt(e.ssim, 3)} | {fmt(e.rotation_error_deg_after, 2)} | "
                     f"{fmt(e.translation_error_before)} → {fmt(e.translation_error_after)} | {e.seconds_fit:.0f} |")
    lines += ["", "Fusion overrides: `" + " ".join(overrides) + "`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from data_prep.procedural import PROCEDURAL_OBJECTS

    p = argparse.ArgumentParser(prog="python -m nova3d.eval.pose_study", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--object", choices=sorted(PROCEDURAL_OBJECTS), help="built-in object, rendered into OUT/gt")
    src.add_argument("--gt", help="an existing GT object folder with mesh.glb (e.g. outputs/demo/gt/torus_knot)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--angles", type=float, nargs="+", default=None,
                   help=f"rotation errors in degrees (default {' '.join(f'{a:g}' for a in DEFAULT_ANGLES)})")
    p.add_argument("--quick", action="store_true", help="2 angles, tiny fusion: checks the chain, not the method")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fusion config overrides (after the budget's)")
    args = p.parse_args(argv)
    from nova3d.demo import DEMO_FUSION, QUICK_FUSION, render_ground_truth

    start = time.perf_counter()
    try:
        out = Path(args.out)
        check_replaceable(out)
        if not args.gt:  # its GT render goes into OUT/gt: OUT (missing, empty or ours) is ours from now on
            out.mkdir(parents=True, exist_ok=True)
            mark_result(out, "nova3d pose study")
        gt = Path(args.gt) if args.gt else render_ground_truth(args.object, out / "gt")
        angles = args.angles or (QUICK_ANGLES if args.quick else DEFAULT_ANGLES)
        overrides = [*(QUICK_FUSION if args.quick else DEMO_FUSION), *args.overrides]
        study = run_pose_study(gt, args.out, angles, overrides)
    except Nova3DError as err:
        print(f"nova3d pose study: error: {err}", file=sys.stderr)
        return 2
    print(Path(study.md_path).read_text())
    print(f"wrote {study.png_path}, {study.json_path}, {study.md_path} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
