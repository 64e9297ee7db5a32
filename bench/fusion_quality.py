"""Fusion quality on built-in objects rendered by data_prep at 256² (issue 4 §3).

    python bench/fusion_quality.py [--quick] [--objects torus_knot block_tower] [--out DIR] [key=value ...]

Per object, three scenarios, each fused with `fusion/default` and the baseline it must beat:
  clean     the Blender views as they are: CD (unit-box, ½ of the two mean NN distances),
            Volume IoU 64³, PSNR of the textured mesh re-rendered at the input cameras; the
            ground truth is the object's outer surface (procedural.solid_object), not its parts;
  conflict  colours of views 3, 6, 10, 13 corrupted (drift, blotch, blur; nova3d.fusion.perturb;
            `--perturb key=value ...` changes the PerturbConfig): texture PSNR vs the CLEAN views,
            default vs `fusion/no_conflict` (target +1 dB), and the conflict map's AUROC for
            corrupted vs clean object pixels (target 0.8). Also `fusion/no_conflict` on the clean
            views: `headroom_db` = that PSNR - no_conflict's on the corrupted ones, what the
            corruption costs the baseline, hence the most any down-weighting could win back;
  pose      views 1..15 moved by up to 5° and 2% of the radius: mean pose error before/after
            refinement (target -50%) and CD, default vs `fusion/no_pose_refine`.
Targets (issue 4): CD <= 0.008, IoU >= 0.85, PSNR >= 28 dB. The last output line is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_prep.procedural import solid_object  # noqa: E402
from nova3d.cameras import Cameras  # noqa: E402
from nova3d.data import schema  # noqa: E402
from nova3d.eval.appearance import psnr_per_view  # noqa: E402
from nova3d.eval.conflict import conflict_auroc  # noqa: E402
from nova3d.eval.geometry import chamfer_surface, volume_iou  # noqa: E402
from nova3d.eval.mesh_render import render_mesh  # noqa: E402
from nova3d.fuse import fuse_object, load_fusion_config  # noqa: E402
from nova3d.fusion.perturb import PerturbConfig, PerturbRecord, load_corruption_masks, perturb_object  # noqa: E402
from nova3d.fusion.views import load_views  # noqa: E402

TARGETS = {"chamfer": 0.008, "iou": 0.85, "psnr": 28.0, "conflict_gain_db": 1.0, "conflict_auroc": 0.8,
           "pose_error_reduction": 0.5}
QUICK = ["optim.fit_resolution=128", "optim.steps=300"]


def render_object(name: str, renders: Path) -> Path:
    folder = renders / name
    if not folder.is_dir():
        subprocess.run([sys.executable, "-m", "data_prep.render_views", "--procedural", name, "--out", str(renders),
                        "--resolution", "256", "--depth"], check=True, cwd=REPO)
    return folder


def gt_mesh(folder: Path) -> trimesh.Trimesh:
    """The procedural object's outer surface (solid_object: no contact faces inside the solid) with
    the renderer's normalisation (meta.json), in the views' world frame."""
    meta = schema.ObjectMeta.load(folder / schema.META_FILE)
    mesh = solid_object(meta.source.split(":", 1)[1])
    norm = meta.normalisation
    mesh.vertices = (np.asarray(mesh.vertices) + norm["offset"]) * norm["scale"]
    return mesh


def mesh_scores(out: Path, clean: Path, gt: trimesh.Trimesh) -> dict:
    """CD / IoU against the GT mesh; texture PSNR of the mesh at the TRUE cameras vs the clean views."""
    pred = trimesh.load(out / "mesh.ply", force="mesh")
    views = load_views(clean)
    rendered = render_mesh(pred, Cameras.load(clean / schema.CAMERAS_FILE), image_size=views.resolution)
    return {"chamfer": chamfer_surface(pred, gt).chamfer, "iou": volume_iou(pred, gt).iou,
            "psnr": float(psnr_per_view(rendered.rgb.clamp(0, 1), views.rgb).mean())}


def fuse(views: Path, out: Path, experiment: str, overrides: list[str]) -> dict:
    cfg = load_fusion_config(experiment, overrides + ["logging.progress=false"])
    result = fuse_object(views, out, cfg)
    return {"result": result, **result.metrics}


def run_object(name: str, root: Path, overrides: list[str], scenarios: list[str], perturb: PerturbConfig) -> dict:
    clean = render_object(name, root / "renders")
    gt = gt_mesh(clean)
    row: dict = {"object": name}
    if "clean" in scenarios:
        row["clean"] = run_clean(clean, gt, root / name, overrides)
    if "conflict" in scenarios:
        row["conflict"] = run_conflict(clean, gt, root / name, overrides, perturb)
    if "pose" in scenarios:
        row["pose"] = run_pose(clean, gt, root / name, overrides)
    return row


def run_clean(clean: Path, gt: trimesh.Trimesh, root: Path, overrides: list[str]) -> dict:
    m = fuse(clean, root / "clean", "fusion/default", overrides)
    return {**mesh_scores(root / "clean", clean, gt), "seconds": m["seconds_total"],
            "psnr_mesh_vs_views": m["psnr_mesh_vs_views"]}


def run_conflict(clean: Path, gt: trimesh.Trimesh, root: Path, overrides: list[str],
                 perturb: PerturbConfig) -> dict:
    bad = root / "conflict_views"
    if bad.is_dir() and PerturbRecord.load(bad).config != dataclasses.asdict(perturb):
        shutil.rmtree(bad)  # made with other corruption settings
    if not bad.is_dir():
        perturb_object(clean, bad, perturb)
    row: dict = {"perturb": dataclasses.asdict(perturb)}
    # key in row, experiment, views fused, out folder name (the oracle: the baseline on clean views)
    for key, exp, views, name in (("fusion/default", "fusion/default", bad, "conflict"),
                                  ("fusion/no_conflict", "fusion/no_conflict", bad, "conflict"),
                                  ("oracle", "fusion/no_conflict", clean, "conflict_oracle")):
        out = root / exp.replace("/", "_") / name
        m = fuse(views, out, exp, overrides)
        row[key] = {**mesh_scores(out, clean, gt), "seconds": m["seconds_total"]}
        if m["result"].conflict is not None:
            masks = load_views(bad).mask.numpy()
            row["auroc"] = conflict_auroc(m["result"].conflict, load_corruption_masks(bad), masks)
    row["gain_db"] = row["fusion/default"]["psnr"] - row["fusion/no_conflict"]["psnr"]
    row["headroom_db"] = row["oracle"]["psnr"] - row["fusion/no_conflict"]["psnr"]
    return row


def run_pose(clean: Path, gt: trimesh.Trimesh, root: Path, overrides: list[str]) -> dict:
    moved = root / "pose_views"
    if not moved.is_dir():
        perturb_object(clean, moved, PerturbConfig(color_views=[], pose_rotation_deg=5.0, pose_translation=0.02,
                                                    seed=2))
    row: dict = {}
    for exp in ("fusion/default", "fusion/no_pose_refine"):
        m = fuse(moved, root / exp.replace("/", "_") / "pose", exp, overrides)
        row[exp] = {**mesh_scores(root / exp.replace("/", "_") / "pose", clean, gt), "seconds": m["seconds_total"],
                    **{k: m[k] for k in m if k.startswith(("rotation_error", "translation_error"))}}
    d = row["fusion/default"]
    row["rotation_error_reduction"] = 1 - d["rotation_error_deg_after"] / d["rotation_error_deg_before"]
    row["translation_error_reduction"] = 1 - d["translation_error_after"] / d["translation_error_before"]
    return row


def verdict(rows: list[dict]) -> dict:
    """Means over objects of each figure the targets name (only for the scenarios that ran)."""
    figures = {"chamfer": ("clean", "chamfer"), "iou": ("clean", "iou"), "psnr": ("clean", "psnr"),
               "seconds_clean_fuse": ("clean", "seconds"), "conflict_gain_db": ("conflict", "gain_db"),
               "conflict_auroc": ("conflict", "auroc"), "conflict_headroom_db": ("conflict", "headroom_db"),
               "pose_error_reduction": ("pose", "rotation_error_reduction"),
               "pose_translation_error_reduction": ("pose", "translation_error_reduction")}
    s = {k: float(np.mean([r[a][b] for r in rows])) for k, (a, b) in figures.items() if a in rows[0]}
    if "pose" in rows[0]:
        for exp in ("fusion/default", "fusion/no_pose_refine"):
            s[f"pose_chamfer_{exp.split('/')[1]}"] = float(np.mean([r["pose"][exp]["chamfer"] for r in rows]))
    s["passed"] = {k: (s[k] <= t if k == "chamfer" else s[k] >= t) for k, t in TARGETS.items() if k in s}
    if "pose" in rows[0]:
        s["passed"]["pose_chamfer_lower"] = s["pose_chamfer_default"] < s["pose_chamfer_no_pose_refine"]
    return s


def conflict_perturbation(settings: list[str]) -> PerturbConfig:
    """PerturbConfig(seed=1) with KEY=VALUE settings; exits with one line on a bad one."""
    values = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(PerturbConfig)}:
            sys.exit(f"fusion_quality: --perturb {item!r} is not KEY=VALUE with a PerturbConfig key")
        values[key] = yaml.safe_load(value)
    return PerturbConfig(**{"seed": 1, **values})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one object, fit at 128², 300 steps")
    parser.add_argument("--objects", nargs="+", default=["torus_knot", "block_tower"])
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "fusion_quality"))
    parser.add_argument("--scenarios", nargs="+", default=["clean", "conflict", "pose"],
                        choices=["clean", "conflict", "pose"])
    parser.add_argument("--perturb", nargs="+", default=[], metavar="KEY=VALUE",
                        help="PerturbConfig settings of the conflict scenario (values in YAML), e.g. "
                             "color_views=[2,3,5,6] blotch_size=0.18")
    parser.add_argument("overrides", nargs="*", help="fusion key=value overrides for every run")
    args = parser.parse_args()
    objects = args.objects[:1] if args.quick else args.objects
    overrides = (QUICK if args.quick else []) + args.overrides
    root = Path(args.out)
    t0 = time.perf_counter()
    perturb = conflict_perturbation(args.perturb)
    rows = [run_object(name, root, overrides, args.scenarios, perturb) for name in objects]
    summary = {"benchmark": "fusion_quality", "quick": args.quick, "objects": objects, "overrides": overrides,
               "scenarios": args.scenarios,
               "threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - t0,
               "targets": TARGETS, **verdict(rows), "per_object": rows}
    (root / f"summary_{'_'.join(args.scenarios)}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
