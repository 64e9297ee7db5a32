"""OUT/report.md of `make demo` (nova3d.demo): pictures, the metrics table, the default run
against each baseline in plain words, the settings, and how to run the real chain.
Every link is relative to the report's folder, so the folder can be moved or zipped."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from nova3d.atomic import atomic_path
from nova3d.eval.results import fmt


@dataclass(frozen=True)
class Column:
    key: str  # "scores.<name>", "metrics.<name>" or "conflict_auroc"
    label: str
    higher_is_better: bool
    unit: str = ""


# What the default run is compared on, in the table's order (pose: the error left after fusion).
COMPARED = (Column("scores.chamfer", "CD", False), Column("scores.volume_iou", "IoU", True),
            Column("scores.psnr", "PSNR", True, " dB"), Column("scores.ssim", "SSIM", True),
            Column("metrics.rotation_error_deg_after", "rotation error after fusion", False, "°"),
            Column("metrics.translation_error_after", "translation error after fusion", False),
            Column("conflict_auroc", "conflict AUROC", True))
CONFLICT_SILENT = 0.05  # conflict maps that never reach this discount nothing worth the name


def value(run, key: str) -> float | None:
    if key == "conflict_auroc":
        x = run.conflict_auroc
    else:
        part, name = key.split(".", 1)
        x = getattr(run, part).get(name)
    return None if x is None or not isinstance(x, (int, float)) or math.isnan(x) else float(x)


def _link(target: Path, report_dir: Path) -> str:
    return Path(os.path.relpath(target, report_dir)).as_posix()


def _pose(run) -> str:
    m = run.metrics
    if "rotation_error_deg_before" not in m:
        return "—"
    return (f"{m['rotation_error_deg_before']:.2f}° → {m['rotation_error_deg_after']:.2f}°; "
            f"{m.get('translation_error_before', math.nan):.4f} → {m.get('translation_error_after', math.nan):.4f}")


def comparison(default, baseline) -> str:
    """One sentence: where the default run is better, worse, or equal to `baseline`."""
    groups: dict[str, list[str]] = {"better": [], "worse": [], "equal": []}
    for c in COMPARED:
        a, b = value(default, c.key), value(baseline, c.key)
        if a is None or b is None:
            continue
        digits = 2 if c.unit in (" dB", "°") else 4
        text = f"{c.label} ({fmt(a, digits)}{c.unit} vs {fmt(b, digits)}{c.unit})"
        if fmt(a, digits) == fmt(b, digits):
            groups["equal"].append(text)
        else:
            groups["better" if (a > b) == c.higher_is_better else "worse"].append(text)
    parts = [f"{kind} on " + ", ".join(items) for kind, items in groups.items() if items]
    return f"Against `{baseline.name}` the default run is " + ("; ".join(parts) or "not comparable") + "."


def notes(demo) -> list[str]:
    """Plain statements about what the numbers do and do not show (read off the results)."""
    out, d = [], demo.runs["default"]
    if d.conflict_max is not None and d.conflict_max < CONFLICT_SILENT:
        out.append(f"The default run's conflict maps stayed at about 0 (largest value {d.conflict_max:.1e}): at "
                   "this budget fusion discounted no pixel, so `default` and `no_conflict` differ by noise only, "
                   "and the conflict AUROC measures noise, not detection.")
    elif d.conflict_auroc is not None and d.conflict_auroc < 0.5:
        out.append(f"The conflict AUROC ({d.conflict_auroc:.3f}) is below chance: the maps are higher on clean "
                   "pixels than on corrupted ones.")
    m = d.metrics
    if m.get("translation_error_after", 0) > m.get("translation_error_before", math.inf):
        out.append(f"Pose refinement lowered the camera rotation error ({m['rotation_error_deg_before']:.2f}° → "
                   f"{m['rotation_error_deg_after']:.2f}°) but raised the camera-centre error "
                   f"({m['translation_error_before']:.4f} → {m['translation_error_after']:.4f}).")
    return [f"- {n}" for n in out]


def _table(demo) -> list[str]:
    lines = ["| run | CD ↓ | IoU ↑ | PSNR ↑ | SSIM ↑ | pose error before → after (rotation; translation) | "
             "conflict AUROC ↑ | fit seconds |", "|---|---|---|---|---|---|---|---|"]
    for name, run in demo.runs.items():
        s = run.scores
        if s.get("status") != "ok":
            lines.append(f"| {name} | not evaluated: {s.get('reason')} | | | | {_pose(run)} | | "
                         f"{run.metrics.get('seconds_fit', 0):.0f} |")
            continue
        auc = "— (no conflict maps)" if run.conflict_auroc is None else fmt(run.conflict_auroc, 3)
        lines.append(f"| {name} (`{run.experiment}`) | {fmt(s['chamfer'])} | {fmt(s['volume_iou'], 3)} | "
                     f"{fmt(s['psnr'], 2)} | {fmt(s['ssim'], 3)} | {_pose(run)} | {auc} | "
                     f"{run.metrics.get('seconds_fit', 0):.0f} |")
    return lines


def report_markdown(demo, report_dir: Path) -> str:
    link = lambda p: _link(Path(p), report_dir)  # noqa: E731
    p = demo.perturb
    default = demo.runs["default"]
    meta, proto = demo.gt_meta, demo.protocol
    V, res = meta.get("num_views", 16), meta.get("resolution", "?")
    renderer = "Blender/Cycles" if "blender" in str(meta.get("renderer", {}).get("name", "")) else \
        f"`{meta.get('renderer', {}).get('name', 'a renderer')}`"
    others = f"views 1..{V - 1}"
    lines = [
        f"# nova3d demo — de-conflict fusion of `{demo.object_id}`",
        "",
        f"A built-in object rendered with {renderer} ({V} views at {res}², elevation 0°, view 0 = input) stands "
        f"in for the views the GTA-SVD model would generate. Simulated generation errors "
        f"(`nova3d/fusion/perturb.py`): colour corruption of views {p['color_views']} "
        f"({', '.join(p['kinds'])}), and the cameras of {others} moved by up to "
        f"{p['pose_rotation_deg']:g}° and {p['pose_translation']:.0%} of the radius (random axis, seed {p['seed']}). "
        f"The same perturbed views were fused {len(demo.runs)} times; every mesh is scored with the GSO "
        f"protocol (`nova3d/eval/protocol.py`) against the **clean** renders and the GT mesh.",
        "",
        "## Input: clean (top) and perturbed (bottom) views",
        "",
        f"![clean vs perturbed views]({link(demo.views_sheet)})",
        "",
        "## Results",
        "",
        *_table(demo),
        "",
        f"CD: Chamfer distance ({proto.get('normalization')} normalisation, ½ of the two mean nearest-neighbour "
        f"distances); IoU: volume IoU on {proto.get('iou_resolution')}³; PSNR/SSIM: texture, rendered at the "
        f"{V} cameras at {proto.get('image_size')}² on white against the clean renders; pose error: mean over "
        f"{others} of the camera rotation (degrees) and camera-centre distance (world units) to the true "
        f"cameras; conflict AUROC: the conflict maps as a detector of the truly corrupted pixels, over object "
        f"pixels of {others}; fit seconds: the optimisation alone (export, pictures and scoring not counted).",
        "",
        "LPIPS: " + ("computed (see each run's eval/summary.json)." if demo.lpips_reason is None
                     else f"not computed — {demo.lpips_reason}."),
        "",
        "**The default run against each baseline** (one object, one seed: small differences are noise):",
        "",
        *[f"- {comparison(default, run)}" for name, run in demo.runs.items() if name != "default"],
        *notes(demo),
        "",
        "## Turntables",
        "",
        "| " + " | ".join(demo.runs) + " |",
        "|" + "---|" * len(demo.runs),
        "| " + " | ".join(f"![{n} turntable]({link(r.out_dir / 'turntable.gif')})" for n, r in demo.runs.items())
        + " |",
        "",
    ]
    if demo.conflict_sheet is not None:
        auc = "—" if default.conflict_auroc is None else fmt(default.conflict_auroc, 3)
        lines += ["## Conflict maps of the default run", "",
                  f"![conflict maps and true corruption]({link(demo.conflict_sheet)})", "",
                  "Row 1: the (perturbed) views fusion was given; row 2: its conflict map per view (viridis, 0–1; "
                  "the input view is trusted, always 0); row 3: the pixels the corruption really changed. "
                  f"AUROC over object pixels of {others}: **{auc}**.", ""]
    lines += [
        "## Files",
        "",
        *[f"- `{n}`: [mesh.glb]({link(r.out_dir / 'mesh.glb')}), [metrics.json]({link(r.out_dir / 'metrics.json')}), "
          + (f"[conflict maps]({link(r.out_dir / 'conflict_maps.png')}), " if r.conflict_auroc is not None else "")
          + f"[evaluation]({link(r.out_dir / 'eval' / 'summary.md')})" for n, r in demo.runs.items()],
        f"- ground truth (Blender renders + `mesh.glb`): `{link(demo.gt_folder)}/`; perturbed views: "
        f"`{link(demo.perturbed)}/` (true cameras and corruption masks under `perturb/`)",
        f"- every number above: [{Path('demo.json')}](demo.json)",
        "",
        "Re-score or compare with the CLI: `nova3d eval --pred "
        f"{default.out_dir.parent} --gt {demo.gt_folder.parent} --out EVAL_DIR`, "
        "`nova3d report " + " ".join(str(r.out_dir) for r in demo.runs.values()) + " --out ablation.md`.",
        "",
        "## Settings",
        "",
        "Fusion overrides (the demo's CPU budget, `nova3d/demo_parts.py: DEMO_FUSION`): `"
        + " ".join(demo.fusion_overrides) + "`.",
        "",
        "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in demo.seconds.items()) + ".",
        "",
        "## The real chain: one image to a textured mesh",
        "",
        "With Stable Video Diffusion weights fine-tuned by `make train EXP=gta_full` (or any NOVA3D pipeline "
        "folder), one command generates the 16 RGB + normal views, fuses them and exports the mesh:",
        "",
        "```bash",
        ".venv/bin/nova3d export runs/gta_full/local --out PIPELINE_DIR   # a trained run -> pipeline folder",
        ".venv/bin/nova3d image-to-3d --image IMG --model PIPELINE_DIR --out out/obj   # generate -> fuse -> export",
        "```",
        "",
        "`out/obj` then holds the generated views (`views/`), `mesh.glb/.obj/.ply`, `turntable.gif`, "
        "`conflict_maps.png` and `metrics.json`, as the runs above.",
        "",
    ]
    return "\n".join(lines)


def write_report(demo, path: str | Path, report_dir: Path | None = None) -> Path:
    """Write the report atomically, its links relative to `report_dir` (where it will live; default:
    beside `path`); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(report_markdown(demo, report_dir or path.parent))
    return path
