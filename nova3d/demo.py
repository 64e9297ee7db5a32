"""`make demo`: the whole method on CPU, no downloads.

    python -m nova3d.demo [--out outputs/demo] [--model pretrained/toy] [--perturbed] [--quick]

Main section (nova3d.demo_chain): one image of an unseen toy object -> the shipped toy pipeline's
16 RGB + 16 normal views -> fusion x3 -> GSO metrics -> OUT/report.md.

The perturbed-render scenario (--perturbed, into OUT/perturbed_demo/; run_demo below): renders
with simulated generation errors of known position stand in for generated views, so the conflict
maps and pose refinement can be scored against the truth. Its stages (a progress line each):
  1. render the built-in object with Blender (16 views at 256², depth on) + its GT mesh.glb
     (data_prep.gso's writer): OUT/gt/<object>/, what `nova3d eval --gt OUT/gt` reads;
  2. simulate generation errors (nova3d.fusion.perturb): colour corruption of 4 non-input views
     (drift, blotch, blur) and pose errors of views 1..15 (up to 3° / 1% of the radius):
     OUT/perturbed/<object>/, plus OUT/views_clean_vs_perturbed.png;
  3. de-conflict fusion of the perturbed views three times, `fusion/default` and the
     `fusion/no_conflict` / `fusion/no_pose_refine` baselines: OUT/fusion/<run>/<object>/ (what
     `nova3d fuse` writes: mesh.glb, turntable.gif, conflict_maps.png, metrics.json, ...);
  4. the GSO protocol (nova3d.eval.protocol) on each mesh against the CLEAN ground truth:
     OUT/fusion/<run>/<object>/eval/ (summary.json, per_object.csv, summary.md: `nova3d report` reads it);
  5. conflict-map AUROC against the true corruption masks (object pixels of non-input views) and
     OUT/conflict_vs_truth.png (views | conflict maps | true corruption) of the default run;
  6. OUT/report.md (pictures, metrics table, the default run against each baseline) + OUT/demo.json.
The Blender render is kept between runs (delete OUT/gt to redo it); everything else is redone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nova3d.atomic import moved_paths, staged_entries, write_json_atomic
from nova3d.demo_parts import (DEMO_FUSION, QUICK_FUSION, QUICK_TOY_FUSION, RENDER_RESOLUTION,  # noqa: F401
                               RENDER_SAMPLES, TOY_FUSION, render_ground_truth, score_mesh)
from nova3d.errors import Nova3DError
from nova3d.eval.conflict import conflict_auroc
from nova3d.fusion.perturb import PerturbConfig
from nova3d.signals import exit_code, interrupts_as_errors

DEMO_OBJECT = "torus_knot"  # no hidden cavities: a mug's inside is invisible at elevation 0 and ruins IoU
RUNS = {"default": "fusion/default", "no_conflict": "fusion/no_conflict", "no_pose_refine": "fusion/no_pose_refine"}
DEMO_PERTURB = PerturbConfig(color_views=[3, 6, 10, 13], kinds=["drift", "blotch", "blur"],
                             pose_rotation_deg=3.0, pose_translation=0.01, pose_magnitude="uniform", seed=0)
VIEWS_SHEET, CONFLICT_SHEET, REPORT, RECORD = ("views_clean_vs_perturbed.png", "conflict_vs_truth.png",
                                               "report.md", "demo.json")


class Progress:
    """`[demo  12.3s] message` lines: where the time goes, stage by stage."""

    def __init__(self, enabled: bool = True):
        self.start, self.enabled = time.perf_counter(), enabled

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[demo {self.elapsed():6.1f}s] {message}", flush=True)


@dataclass
class RunResult:
    """One fusion run of the demo, fused and scored."""

    name: str  # key of RUNS
    experiment: str
    out_dir: Path  # what nova3d fuse wrote (mesh.glb, turntable.gif, metrics.json, eval/ ...)
    metrics: dict  # metrics.json
    scores: dict  # chamfer, volume_iou, psnr, ssim, lpips (ObjectResult.scalars()) + status
    conflict_auroc: float | None = None  # None: the run has no conflict maps
    conflict_max: float | None = None  # largest conflict value over views 1.. (None: no conflict maps)


@dataclass
class DemoResult:
    out: Path
    object_id: str
    gt_folder: Path
    perturbed: Path
    runs: dict[str, RunResult]
    fusion_overrides: list[str]
    perturb: dict  # PerturbConfig fields
    lpips_reason: str | None
    views_sheet: Path
    conflict_sheet: Path | None
    protocol: dict = field(default_factory=dict)  # EvalProtocol fields
    gt_meta: dict = field(default_factory=dict)  # the GT folder's meta.json
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage


# ---------------------------------------------------------------- stage 1: ground truth

# ---------------------------------------------------------------- stage 2: perturbed input

def views_sheet(clean: str | Path, perturbed: str | Path, out_path: str | Path, tile: int = 96) -> Path:
    """One PNG: the clean views (row 1) over the perturbed ones (row 2), labelled with what
    perturb did to each view (corruption kind, camera rotation)."""
    from PIL import Image, ImageDraw

    from nova3d.data.shards import read_object_folder
    from nova3d.fusion.perturb import PerturbRecord
    from nova3d.viz import save_png_atomic

    record = PerturbRecord.load(perturbed)
    rows = []
    for folder in (clean, perturbed):
        rgba = read_object_folder(folder).rgba.astype(np.float32) / 255  # [V, 4, H, W]
        on_white = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])
        rows.append([Image.fromarray((v.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).resize((tile, tile))
                     for v in on_white])
    V, label_h = len(rows[0]), 26
    sheet = Image.new("RGB", (V * tile, 2 * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, images in enumerate(rows):
        y = r * (tile + label_h)
        for v, image in enumerate(images):
            sheet.paste(image, (v * tile, y + label_h))
            if r == 0:
                draw.text((v * tile + 3, y + 1), f"clean {v}", fill="black")
            else:
                kind = record.view_kinds[v] or ("input" if v == record.input_view else "")
                draw.text((v * tile + 3, y + 1), f"{v} {kind}", fill="red" if record.view_kinds[v] else "black")
                draw.text((v * tile + 3, y + 13), f"{record.rotation_deg[v]:.1f}deg", fill="black")
    return save_png_atomic(sheet, out_path)


# ---------------------------------------------------------------- stages 3-5: fuse, score

def fuse_and_score(name: str, perturbed: Path, gt_folder: Path, out_dir: Path, overrides: Sequence[str],
                   protocol, lpips) -> tuple[RunResult, "FuseResult"]:  # noqa: F821
    from nova3d.data.shards import read_object_folder
    from nova3d.fuse import fuse_object, load_fusion_config
    from nova3d.fusion.perturb import load_corruption_masks

    cfg = load_fusion_config(RUNS[name], list(overrides))
    fused = fuse_object(perturbed, out_dir, cfg)
    result = score_mesh(fused.meshes["glb"], gt_folder, out_dir / "eval", protocol, lpips)
    scores = {**result.scalars(), "status": result.status, "reason": result.reason}
    auc = peak = None
    if fused.conflict is not None:
        sample = read_object_folder(perturbed)
        auc = conflict_auroc(fused.conflict, load_corruption_masks(perturbed), sample.mask,
                             sample.cameras.input_view)
        others = [v for v in range(len(fused.conflict)) if v != sample.cameras.input_view]
        peak = float(fused.conflict[others].max())
    return RunResult(name, RUNS[name], out_dir, fused.metrics, scores, auc, peak), fused


def run_demo(gt_folder: str | Path, out: str | Path, fusion_overrides: Sequence[str] = DEMO_FUSION,
             perturb: PerturbConfig = DEMO_PERTURB, runs: Sequence[str] = tuple(RUNS), protocol=None,
             progress: Progress | None = None, seconds: dict[str, float] | None = None) -> DemoResult:
    """Stages 2-6 (module docstring) on a ready GT object folder (with mesh.glb); returns what was made."""
    from nova3d.demo_report import write_report

    log = progress or Progress(False)
    gt_folder, out = Path(gt_folder), Path(out)
    unknown = [r for r in runs if r not in RUNS]
    if unknown or "default" not in runs:
        raise Nova3DError(f"demo runs {list(runs)}: must include 'default', known: {', '.join(RUNS)}")
    with staged_entries(out, "demo") as stage:  # redone every time; a failed run keeps the previous results
        demo = _perturb_fuse_score(gt_folder, stage, fusion_overrides, perturb, runs, protocol, log, seconds)
        demo = moved_paths(demo, stage, out)
        demo.report = out / REPORT
        write_report(demo, stage / REPORT, report_dir=out)
        write_json_atomic(stage / RECORD, _record(demo))
    log(f"wrote {demo.report}")
    return demo


def _perturb_fuse_score(gt_folder: Path, out: Path, fusion_overrides: Sequence[str], perturb: PerturbConfig,
                        runs: Sequence[str], protocol, log: Progress, seconds: dict | None) -> DemoResult:
    from nova3d.eval.appearance import load_lpips
    from nova3d.eval.protocol import get_protocol
    from nova3d.fusion.perturb import load_corruption_masks, perturb_object
    from nova3d.fusion.preview import conflict_sheet

    object_id = gt_folder.name
    perturbed = out / "perturbed" / object_id
    seconds, t = dict(seconds or {}), time.perf_counter()  # + earlier stages' times (the render)

    log(f"perturb {object_id}: colour corruption of views {perturb.color_views}, poses up to "
        f"{perturb.pose_rotation_deg:g} deg / {perturb.pose_translation:.0%} radius")
    perturb_object(gt_folder, perturbed, perturb)
    sheet = views_sheet(gt_folder, perturbed, out / VIEWS_SHEET)
    seconds["perturb"] = time.perf_counter() - t

    proto = protocol or get_protocol("nova3d")
    lpips = load_lpips(proto.lpips_net) if proto.lpips else (None, "LPIPS disabled by the protocol")
    results, conflict_png = {}, None
    for name in runs:
        t = time.perf_counter()
        log(f"fuse {name} ({RUNS[name]}) ...")
        run, fused = fuse_and_score(name, perturbed, gt_folder, out / "fusion" / name / object_id,
                                    fusion_overrides, proto, lpips)
        results[name] = run
        if name == "default":
            masks = load_corruption_masks(perturbed)
            conflict_png = conflict_sheet(fused.views.rgb.cpu(), fused.conflict, out / CONFLICT_SHEET, truth=masks)
        seconds[f"fuse+eval {name}"] = time.perf_counter() - t
        s = run.scores
        log(f"  {name}: fit {run.metrics['seconds_fit']:.0f}s, CD {s['chamfer'] or float('nan'):.4f}, "
            f"IoU {s['volume_iou'] or float('nan'):.3f}, PSNR {s['psnr'] or float('nan'):.2f}"
            + ("" if run.conflict_auroc is None else f", conflict AUROC {run.conflict_auroc:.3f}"))
        del fused  # the fields of one run are not needed by the next

    demo = DemoResult(out, object_id, gt_folder, perturbed, results, list(fusion_overrides),
                      dataclasses.asdict(perturb), lpips[1], sheet, conflict_png, protocol=dataclasses.asdict(proto),
                      gt_meta=json.loads((gt_folder / "meta.json").read_text()), seconds=seconds)
    return demo


def _record(demo: DemoResult) -> dict:
    """demo.json: every number of the report, machine-readable."""
    return {"object_id": demo.object_id, "gt_folder": str(demo.gt_folder), "perturbed": str(demo.perturbed),
            "fusion_overrides": demo.fusion_overrides, "perturb": demo.perturb, "lpips_reason": demo.lpips_reason,
            "seconds": demo.seconds,
            "runs": {n: {"experiment": r.experiment, "out_dir": str(r.out_dir), "metrics": r.metrics,
                         "scores": {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v))
                                    for k, v in r.scores.items()},
                         "conflict_auroc": r.conflict_auroc, "conflict_max": r.conflict_max}
                     for n, r in demo.runs.items()}}


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    from data_prep.procedural import PROCEDURAL_OBJECTS
    from nova3d.demo_chain import TOY_MODEL, TOY_OBJECT, TOY_STEPS, run_chain
    from nova3d.hub_noise import quiet_hub_libraries

    p = argparse.ArgumentParser(prog="python -m nova3d.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--model", default=str(TOY_MODEL), help="pipeline folder (default: the shipped toy model)")
    p.add_argument("--toy-object", default=TOY_OBJECT, help=f"toy-family object to start from (default: "
                                                            f"{TOY_OBJECT}, test split)")
    p.add_argument("--steps", type=int, default=TOY_STEPS, help="sampling steps")
    p.add_argument("--perturbed", action="store_true", help="also the perturbed-render scenario (OUT/perturbed_demo/, "
                                                            "~6 min more): fusion of renders with known errors")
    p.add_argument("--object", default=DEMO_OBJECT, choices=sorted(PROCEDURAL_OBJECTS),
                   help=f"built-in object of the perturbed scenario (default: {DEMO_OBJECT})")
    p.add_argument("--quick", action="store_true", help="tiny fusion budgets: checks the chain, not the method")
    args = p.parse_args(argv)
    log = Progress()
    try:
        # SIGTERM/SIGINT: one line and 128 + signal, the previous demo kept
        with interrupts_as_errors(), quiet_hub_libraries():
            out = Path(args.out)
            chain = run_chain(out, args.model, args.toy_object, QUICK_TOY_FUSION if args.quick else TOY_FUSION,
                              steps=min(args.steps, 6) if args.quick else args.steps, log=log)
            if args.perturbed:
                sub = out / "perturbed_demo"
                log(f"perturbed scenario: render {args.object} with Blender ({RENDER_RESOLUTION}², 16 views, "
                    "depth) ...")
                t = time.perf_counter()
                gt = render_ground_truth(args.object, sub / "gt")
                demo = run_demo(gt, sub, QUICK_FUSION if args.quick else DEMO_FUSION, progress=log,
                                seconds={"render + GT mesh": time.perf_counter() - t})
                log(f"perturbed scenario: {demo.report}")
    except Nova3DError as err:
        print(f"nova3d demo: error: {err}", file=sys.stderr)
        return exit_code(err)
    log(f"done in {log.elapsed():.0f}s: open {chain.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
