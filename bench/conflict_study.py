"""Explicit vs learned conflict (issue 15 §2): does the implicit conflict map learn what an oracle
would tell it?

    python bench/conflict_study.py [--quick] [--objects torus_knot block_tower] [--out DIR] [key=value ...]

Per object (rendered by data_prep at 256², as bench/fusion_quality.py does, whose helpers this
reuses), on the SAME corrupted views (views 3, 6, 10, 13: drift, blotch, blur; PerturbConfig(seed=1),
fusion_quality's conflict scenario):
  implicit    fusion/default: the map learns from the colour error alone;
  supervised  fusion/supervised_conflict: + BCE to the true corruption masks (the oracle bound);
  none        fusion/no_conflict;
scored by texture PSNR of the mesh at the true cameras vs the CLEAN views, CD / IoU against the
object's surface, and the map's AUROC for corrupted vs clean object pixels.
The reverse question: where does the implicit map fire off the corruption mask? Each conflict arm
writes conflict_vs_truth.png (views, map, true corruption, map outside it), and the implicit arm is
also fused on the same views with the cameras moved (up to 5°, 2% of the radius): per view, the
mean off-mask conflict against the pose error left after refinement (Spearman over views 1..15),
per pixel against grazing view angle 1-|n.v| and the clean view's colour gradient (texture edges).
The renders' light is a uniform white world (data_prep.render_views): there is no n.l shading to
test, so grazing angle stands in for view-dependent appearance.
A finished arm (metrics.json with the same steps) is reused; delete its folder to refit it.
The last output line is one JSON object (also written to OUT/summary_<objects>.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.fusion_quality import QUICK, gt_mesh, mesh_scores, render_object  # noqa: E402
from nova3d.cameras import Cameras  # noqa: E402
from nova3d.eval.conflict import conflict_auroc  # noqa: E402
from nova3d.fuse import TRUE_CAMERAS, fuse_object, load_fusion_config  # noqa: E402
from nova3d.fusion.perturb import PerturbConfig, load_corruption_masks, perturb_object  # noqa: E402
from nova3d.fusion.poses import pose_error, rays_for_pixels  # noqa: E402
from nova3d.fusion.preview import conflict_sheet, off_mask_conflict  # noqa: E402
from nova3d.fusion.views import load_views, pixel_centres  # noqa: E402

ARMS = {"implicit": "fusion/default", "supervised": "fusion/supervised_conflict", "none": "fusion/no_conflict"}
COLOR = dict(seed=1)  # fusion_quality's conflict scenario: the same corrupted views
POSE = dict(seed=1, pose_rotation_deg=5.0, pose_translation=0.02)  # + fusion_quality's pose error


def perturbed(clean: Path, dst: Path, settings: dict) -> Path:
    if not dst.is_dir():
        perturb_object(clean, dst, PerturbConfig(**settings))
    return dst


def fused(views: Path, out: Path, experiment: str, overrides: list[str]) -> dict:
    """metrics.json of `experiment` on `views` in `out`, fitted unless a finished run is there."""
    cfg = load_fusion_config(experiment, overrides + ["logging.progress=false"])
    done = out / "metrics.json"
    if done.is_file():
        metrics = json.loads(done.read_text())
        if metrics.get("experiment") == cfg.name and metrics.get("steps") == cfg.optim.steps:
            return metrics
    return fuse_object(views, out, cfg).metrics


def conflict_maps(out: Path) -> torch.Tensor | None:
    path = out / "conflict_maps.npz"
    return torch.from_numpy(np.load(path)["conflict"].astype(np.float32)) if path.is_file() else None


def at(x: torch.Tensor, size: int) -> torch.Tensor:
    """[V, (C,) H, W] -> area-resized to size² (the conflict maps' resolution)."""
    squeeze = x.dim() == 3
    y = torch.nn.functional.interpolate(x[:, None] if squeeze else x, size=(size, size), mode="area")
    return y[:, 0] if squeeze else y


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)  # a view corrupted all over (drift) has no off-mask pixels
    a, b = a[ok], b[ok]
    return float(spearmanr(a, b).statistic) if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0 else float("nan")


def pixel_cues(clean: Path, size: int) -> dict[str, torch.Tensor]:
    """Per-pixel [V, size, size] cues at the clean views: grazing = 1 - |n.v| (true normals and
    cameras) and the colour gradient magnitude (texture edges)."""
    views = load_views(clean)
    normal = torch.nn.functional.normalize(at(views.normal, size), dim=1)
    cams = views.cameras
    K = cams.K.float().clone()
    K[:, :2] *= size / views.resolution
    pix = pixel_centres(size, size)
    dirs = torch.stack([rays_for_pixels(cams.c2w[v:v + 1].float().expand(len(pix), 4, 4),
                                        K[v:v + 1].expand(len(pix), 3, 3), pix)[1] for v in range(len(K))])
    cos = (normal.permute(0, 2, 3, 1).reshape(len(K), -1, 3) * dirs).sum(-1).abs().reshape(len(K), size, size)
    rgb = at(views.rgb, size)
    gy, gx = rgb.diff(dim=2, append=rgb[:, :, -1:]), rgb.diff(dim=3, append=rgb[:, :, :, -1:])
    return {"grazing": 1 - cos, "color_gradient": (gx.square() + gy.square()).sum(1).sqrt(),
            "object": at(views.mask, size) > 0.5}


def off_mask_stats(conflict: torch.Tensor, bad: Path, cues: dict) -> dict:
    """How much the map fires outside the true corruption, and with which per-pixel cue."""
    truth = load_corruption_masks(bad)
    fp = off_mask_conflict(conflict, truth)
    keep = cues["object"].clone()
    keep[0] = False  # the input view is trusted by construction
    clean_px = keep & (off_mask_conflict(torch.ones_like(conflict), truth) > 0)
    on_px = keep & ~clean_px
    x = fp[clean_px].numpy()
    return {"conflict_on_mask": float(conflict[on_px].mean()), "conflict_off_mask": float(x.mean()),
            "off_mask_share_above_0.5": float((x > 0.5).mean()),
            **{f"spearman_off_mask_vs_{k}": spearman(x, cues[k][clean_px].numpy())
               for k in ("grazing", "color_gradient")},
            "per_view_off_mask": [float(fp[v][clean_px[v]].mean()) if clean_px[v].any() else float("nan")
                                  for v in range(len(fp))]}


def run_object(name: str, root: Path, overrides: list[str], pose: bool = True, arms: tuple = tuple(ARMS)) -> dict:
    clean = render_object(name, root / "renders")
    gt = gt_mesh(clean)
    bad = perturbed(clean, root / name / "conflict_views", COLOR)
    masks, objects = load_corruption_masks(bad), load_views(bad).mask.numpy()
    row: dict = {"object": name}
    cues = None
    for arm in arms:
        experiment, out = ARMS[arm], root / name / arm
        m = fused(bad, out, experiment, overrides)
        row[arm] = {**mesh_scores(out, clean, gt), "seconds": m["seconds_total"]}
        conflict = conflict_maps(out)
        if conflict is not None:
            cues = cues or pixel_cues(clean, conflict.shape[-1])
            row[arm]["auroc"] = conflict_auroc(conflict, masks, objects)
            row[arm].update(off_mask_stats(conflict, bad, cues))
            rgb = at(load_views(bad).rgb, conflict.shape[-1])
            conflict_sheet(rgb, conflict, out / "conflict_vs_truth.png", truth=masks, tile=96, off_mask=True)
    if pose:
        row["pose"] = run_pose(clean, gt, root / name, overrides, cues)
    return row


def run_pose(clean: Path, gt, root: Path, overrides: list[str], cues: dict | None) -> dict:
    """The implicit map on the same corruption with moved cameras: does it fire where poses are wrong?"""
    bad = perturbed(clean, root / "conflict_pose_views", POSE)
    out = root / "implicit_pose"
    m = fused(bad, out, ARMS["implicit"], overrides)
    conflict = conflict_maps(out)
    stats = off_mask_stats(conflict, bad, cues or pixel_cues(clean, conflict.shape[-1]))
    refined = Cameras.load(out / "cameras_refined.json").c2w
    true = Cameras.load(bad / TRUE_CAMERAS).c2w
    rot_left, _ = pose_error(refined, true)
    rot_given, _ = pose_error(Cameras.load(bad / "cameras.json").c2w, true)
    per_view = np.array(stats.pop("per_view_off_mask"))
    rgb = at(load_views(bad).rgb, conflict.shape[-1])
    conflict_sheet(rgb, conflict, out / "conflict_vs_truth.png", truth=load_corruption_masks(bad), tile=96,
                   off_mask=True)
    return {**mesh_scores(out, clean, gt), **stats, "auroc": conflict_auroc(conflict, load_corruption_masks(bad), load_views(bad).mask.numpy()),
            "rotation_error_deg_given": rot_given[1:].tolist(), "rotation_error_deg_left": rot_left[1:].tolist(),
            "per_view_off_mask": per_view[1:].tolist(),
            "spearman_view_off_mask_vs_pose_error_left": spearman(per_view[1:], rot_left[1:].numpy()),
            "spearman_view_off_mask_vs_pose_error_given": spearman(per_view[1:], rot_given[1:].numpy()),
            "seconds": m["seconds_total"]}


def summary(rows: list[dict]) -> dict:
    """Means over objects of each arm's figures and of the pose run's."""
    s: dict = {}
    for arm in [a for a in ARMS if a in rows[0]]:
        keys = [k for k, v in rows[0][arm].items() if isinstance(v, float)]
        s[arm] = {k: float(np.nanmean([r[arm][k] for r in rows])) for k in keys}
    posed = [r["pose"] for r in rows if "pose" in r]
    if posed:
        keys = [k for k, v in posed[0].items() if isinstance(v, float)]
        s["implicit_pose"] = {k: float(np.nanmean([p[k] for p in posed])) for k in keys}
        # pooled over objects' views (each object's over its own mean: objects differ in level);
        # 15 views per object is little for one correlation
        s["implicit_pose"]["spearman_view_off_mask_vs_pose_error_left_pooled"] = spearman(
            np.concatenate([np.array(p["per_view_off_mask"]) / np.nanmean(p["per_view_off_mask"]) for p in posed]),
            np.concatenate([p["rotation_error_deg_left"] for p in posed]))
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fusion_quality's QUICK budget: fit at 128², 300 steps")
    parser.add_argument("--objects", nargs="+", default=["torus_knot", "block_tower"])
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "conflict_study"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                        help="which of the three fusions to run")
    parser.add_argument("--pose-objects", nargs="*", default=None,
                        help="objects that also get the moved-camera run (default: all)")
    parser.add_argument("overrides", nargs="*", help="fusion key=value overrides for every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = (QUICK if args.quick else []) + args.overrides
    root = Path(args.out)
    t0 = time.perf_counter()
    posed = args.objects if args.pose_objects is None else args.pose_objects
    rows = [run_object(name, root, overrides, name in posed, tuple(args.arms)) for name in args.objects]
    result = {"benchmark": "conflict_study", "quick": args.quick, "objects": args.objects, "overrides": overrides,
              "threads": args.threads, "wall_seconds": time.perf_counter() - t0, "mean": summary(rows),
              "per_object": rows}
    (root / f"summary_{'_'.join(args.objects + args.arms)}.json").write_text(json.dumps(result, indent=1))  # per object set:
    # objects can run side by side (one thread each) into the same --out
    print(json.dumps(result))


if __name__ == "__main__":
    main()
