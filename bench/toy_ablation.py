"""The paper's central ablation at toy scale (issue 24): `toy` against `ablations/toy_no_gta`, several
training seeds each, same data, same recipe, same steps; scored on the test split.

    python bench/toy_ablation.py [--steps 2500] [--seeds 0 1] [--objects 8] [--root ~/.cache/nova3d/ablation]
                                 [--arms toy toy_no_gta | toy toy_image_prior]
                                 [--max-time DD:HH:MM:SS] [--jobs 2] [--fusion-budget toy|quick|none]
                                 [--name ablation]

Each arm trains from scratch with experiments/toy.yaml's recipe (the no-GTA arm only switches GTA off)
and `seed=S` (weights and noise; the data order, data.seed, is the same for all). Runs live in
ROOT/<arm>_s<seed>/ and resume: with --max-time a piece stops in time and the next launch continues
it, so the ablation can be trained over several sessions. The true-view reference (the same fusion
on the objects' true renders, ROOT/bench/true_views/) is computed as one more job beside the
trainings. When every run has reached --steps, each is exported and scored by
bench/toy_generation.py (generated views and, unless --fusion-budget none, meshes fused from them
against the GT meshes), one run per job; a run's score is kept in ROOT/bench/scores/<run>.json
with the settings it was scored under, so an interrupted scoring resumes at the first run not
scored. Writes ROOT/NAME.json (--name, default ablation): per run the bench's keys plus `seed` and `experiment`; per arm
the mean and the spread (max - min over seeds) of each key. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_pilots import PY, ROOT, train_and_export  # noqa: E402

from nova3d.atomic import write_json_atomic  # noqa: E402
from nova3d.fuse import fusion_config_digest  # noqa: E402

ARMS = {"toy": "toy", "toy_no_gta": "ablations/toy_no_gta",
        "toy_image_prior": "ablations/toy_image_prior"}  # issue 15 §1: the image-UNet twin (--arms)
SCORED = ("rgb_normal_mask_iou", "normal_error_deg_generated", "psnr_generated", "psnr_view0", "chamfer_fused",
          "iou_fused")


def trained_steps(run: Path) -> int:
    """The global step of a run directory's last checkpoint (0 when it has none)."""
    import torch

    ckpt = run / "checkpoints" / "last.ckpt"
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]) if ckpt.is_file() else 0


def toy_fusion(budget: str) -> tuple[str, ...] | None:
    from nova3d.demo_parts import QUICK_TOY_FUSION, TOY_FUSION

    return {"toy": TOY_FUSION, "quick": QUICK_TOY_FUSION, "none": None}[budget]


def bench_call(name: str, extra: list[str], args) -> None:
    """bench/toy_generation.py with the ablation's objects, budget and OUT (ROOT/bench), one thread,
    its output in ROOT/NAME.score.log."""
    import subprocess

    bench = [PY, str(ROOT / "bench" / "toy_generation.py"), "--objects", str(args.objects), "--steps",
             str(args.sampling_steps), "--fusion-budget", args.fusion_budget, "--out", str(args.root / "bench"),
             "--data", str(args.data), *extra]
    with open(args.root / f"{name}.score.log", "w") as log:
        done = subprocess.run(bench, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"toy_ablation: toy_generation for {name} failed (exit {done.returncode}); see {log.name}")


def weights_digest(export: Path) -> str:
    """A digest of an exported pipeline's UNet weights: a run retrained with another recipe is scored again."""
    import hashlib

    digest = hashlib.sha1()
    for f in sorted((export / "unet").glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def scored_run(name: str, export: Path, args, settings: dict) -> dict:
    """bench/toy_generation.py on one run (one thread), its SCORED keys kept in ROOT/bench/scores/NAME.json
    with `settings` and the run's weights digest: a rerun scores only the runs not scored the same way."""
    settings = {**settings, "unet": weights_digest(export)}
    cache = args.root / "bench" / "scores" / f"{name}.json"
    if cache.is_file() and (kept := json.loads(cache.read_text())).get("settings") == settings:
        return kept["row"]
    bench_call(name, ["--runs", f"{name}={export}"], args)
    metrics = json.loads((args.root / "bench" / name / "metrics.json").read_text())
    row = {k: metrics.get(k) for k in SCORED}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"settings": settings, "row": row})
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["toy", "toy_no_gta"],
                   help="which arms (default: the GTA ablation; toy toy_image_prior: image vs video UNet)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--objects", type=int, default=8, help="test objects scored")
    p.add_argument("--root", type=Path, default=Path.home() / ".cache" / "nova3d" / "ablation")
    p.add_argument("--max-time", default=None, help="wall-clock cap of this piece per run (DD:HH:MM:SS)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained side by side (one thread each)")
    p.add_argument("--fusion-budget", choices=["toy", "quick", "none"], default="toy")
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "toy")
    p.add_argument("--name", default="ablation", help="the result is ROOT/NAME.json (one per comparison)")
    args = p.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    runs = {f"{arm}_s{seed}": (arm, seed) for arm in args.arms for seed in args.seeds}
    extra = [f"trainer.max_steps={args.steps}", *([f"trainer.max_time={args.max_time}"] if args.max_time else [])]

    def train(name: str):
        arm, seed = runs[name]
        return train_and_export(name, ARMS[arm], [f"seed={seed}", *extra], args.root)

    with ThreadPoolExecutor(args.jobs) as pool:
        if args.fusion_budget != "none":  # submitted first: it runs beside the trainings, not after them
            reference = pool.submit(bench_call, "reference", ["--reference-only"], args)
        exports = dict(zip(runs, pool.map(train, runs)))
        if args.fusion_budget != "none":
            reference.result()
    reached = {n: trained_steps(args.root / n / ARMS[runs[n][0]] / "local") for n in runs}
    if any(step < args.steps for step in reached.values()):
        print(f"toy_ablation: not all runs reached {args.steps} steps ({reached}); run the same command again "
              "to continue them")
        return 0
    fusion = toy_fusion(args.fusion_budget)
    settings = {"steps": args.steps, "objects": args.objects, "sampling_steps": args.sampling_steps,
                "fusion": list(fusion or []), "fusion_config": fusion_config_digest(fusion or ())}

    def score(name: str) -> dict:
        return {**scored_run(name, exports[name][0], args, settings), "seed": runs[name][1],
                "experiment": ARMS[runs[name][0]]}

    with ThreadPoolExecutor(args.jobs) as pool:
        per_run = dict(zip(runs, pool.map(score, runs)))
    per_arm = {}
    for arm in args.arms:
        rows = [per_run[n] for n in runs if runs[n][0] == arm]
        per_arm[arm] = {k: {"mean": float(np.mean(v)), "spread": float(np.ptp(v))}
                        for k in SCORED if (v := [r[k] for r in rows if r[k] is not None])}
    write_json_atomic(args.root / f"{args.name}.json", {"steps": args.steps, "seeds": args.seeds, "runs": per_run,
                                                    "arms": per_arm, "objects": args.objects})
    print("| arm | " + " | ".join(SCORED) + " |")
    print("|---|" + "---|" * len(SCORED))
    for arm, stats in per_arm.items():
        print(f"| {arm} | " + " | ".join(f"{stats[k]['mean']:.4g} ± {stats[k]['spread'] / 2:.2g}" if k in stats else "—"
                                         for k in SCORED) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
