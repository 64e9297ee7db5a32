"""Does the ground-truth-free consistency score follow the ground truth on generated views? (issue 15 §3)

    python bench/consistency_vs_truth.py --bench DIR [--runs toy_s0 toy_no_gta_s0 ...] [--out OUT] [--jobs 2]

DIR is a bench/toy_generation.py output: DIR/<run>/views/<object>/ holds a model's generated views
and DIR/<run>/per_object.json their scores against the truth (view PSNR, normal error, fused
Chamfer / Volume IoU). Every generated folder is scored by nova3d.eval.consistency (fit the even
views, render at the odd ones and the reverse; no ground truth), kept per object in
OUT/<run>/<object>.json so a cut-off run resumes. Reported: Spearman's rank correlation, over all
(object, run) pairs, between the consistency PSNR and each truth score. A useful score correlates
positively with view PSNR and fused IoU, negatively with normal error and Chamfer. Writes
OUT/consistency_vs_truth.json and prints a markdown table. OUT defaults to DIR/consistency.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nova3d.atomic import write_json_atomic  # noqa: E402
from nova3d.eval.consistency import ConsistencySettings, object_consistency, settings_json  # noqa: E402

TRUTH = {"psnr": "view PSNR vs truth", "normal_error_deg": "normal error vs truth (°)",
         "chamfer": "fused Chamfer", "volume_iou": "fused Volume IoU"}


def scored(folder: Path, cache: Path) -> dict:
    """The consistency scalars of one generated folder, kept in `cache` with the settings they used."""
    settings = settings_json(ConsistencySettings())
    if cache.is_file() and (kept := json.loads(cache.read_text())).get("settings") == settings:
        return kept["scores"]
    torch.set_num_threads(1)
    scores = object_consistency(folder).scalars()
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"settings": settings, "scores": scores})
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, required=True, help="a bench/toy_generation.py output folder")
    p.add_argument("--runs", nargs="+", default=None, help="runs under BENCH (default: every one with views)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--jobs", type=int, default=1, help="objects scored side by side, one thread each")
    args = p.parse_args(argv)
    if not args.bench.is_dir():
        print(f"consistency_vs_truth: error: {args.bench}: not a folder (a bench/toy_generation.py output)",
              file=sys.stderr)
        return 2
    out = args.out or args.bench / "consistency"
    runs = args.runs or sorted(d.name for d in args.bench.iterdir() if (d / "per_object.json").is_file())
    rows = []
    for run in runs:
        truth = args.bench / run / "per_object.json"
        if not truth.is_file():
            print(f"consistency_vs_truth: error: {truth}: missing (not a toy_generation run)", file=sys.stderr)
            return 2
        rows += [{"run": run, **o} for o in json.loads(truth.read_text())]
    folders = [args.bench / r["run"] / "views" / r["object"] for r in rows]
    caches = [out / r["run"] / f"{r['object']}.json" for r in rows]
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for row, scores in zip(rows, pool.map(scored, folders, caches)):
            row.update(scores)
    consistency = np.array([r["consistency_psnr"] for r in rows], dtype=float)
    correlations = {}
    for key in TRUTH:
        truth = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        keep = np.isfinite(truth) & np.isfinite(consistency)
        rho, p_value = spearmanr(consistency[keep], truth[keep])
        correlations[key] = {"spearman": float(rho), "p_value": float(p_value), "pairs": int(keep.sum())}
    write_json_atomic(out / "consistency_vs_truth.json", {"runs": runs, "correlations": correlations,
                                                          "settings": settings_json(ConsistencySettings()),
                                                          "objects": rows})
    print(f"| consistency PSNR against | Spearman ρ | p | pairs ({len(runs)} runs) |")
    print("|---|---|---|---|")
    for key, c in correlations.items():
        print(f"| {TRUTH[key]} | {c['spearman']:+.2f} | {c['p_value']:.2g} | {c['pairs']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
