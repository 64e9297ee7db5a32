"""The paper's central ablation at toy scale (issue 24): `toy` against `ablations/toy_no_gta`, several
training seeds each, same data, same recipe, same steps; scored on the test split.

    python bench/toy_ablation.py [--steps 2500] [--seeds 0 1] [--objects 8] [--root ~/.cache/nova3d/ablation]
                                 [--arms toy toy_no_gta | toy toy_image_prior]
                                 [--max-time DD:HH:MM:SS] [--jobs 2] [--fusion-budget toy|quick|none]

Each arm trains from scratch with experiments/toy.yaml's recipe (the no-GTA arm only switches GTA off)
and `seed=S` (weights and noise; the data order, data.seed, is the same for all). Runs live in
ROOT/<arm>_s<seed>/ and resume: with --max-time a piece stops in time and the next launch continues
it, so the ablation can be trained over several sessions. When every run has reached --steps, each is
exported and scored by bench/toy_generation.py (generated views and, unless --fusion-budget none,
meshes fused from them against the GT meshes and against the same fusion on the true renders).
Writes ROOT/ablation.json: per run the bench's keys plus `seed` and `experiment`; per arm the mean
and the spread (max - min over seeds) of each key. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_pilots import PY, ROOT, train_and_export  # noqa: E402

ARMS = {"toy": "toy", "toy_no_gta": "ablations/toy_no_gta",
        "toy_image_prior": "ablations/toy_image_prior"}  # issue 15 §1: the image-UNet twin (--arms)
SCORED = ("rgb_normal_mask_iou", "normal_error_deg_generated", "psnr_generated", "psnr_view0", "chamfer_fused",
          "iou_fused")


def trained_steps(run: Path) -> int:
    """The global step of a run directory's last checkpoint (0 when it has none)."""
    import torch

    ckpt = run / "checkpoints" / "last.ckpt"
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]) if ckpt.is_file() else 0


def main(argv: list[str] | None = None) -> int:
    import subprocess

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
    args = p.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    runs = {f"{arm}_s{seed}": (arm, seed) for arm in args.arms for seed in args.seeds}
    extra = [f"trainer.max_steps={args.steps}", *([f"trainer.max_time={args.max_time}"] if args.max_time else [])]

    def train(name: str):
        arm, seed = runs[name]
        return train_and_export(name, ARMS[arm], [f"seed={seed}", *extra], args.root)

    with ThreadPoolExecutor(args.jobs) as pool:
        exports = dict(zip(runs, pool.map(train, runs)))
    reached = {n: trained_steps(args.root / n / ARMS[runs[n][0]] / "local") for n in runs}
    if any(step < args.steps for step in reached.values()):
        print(f"toy_ablation: not all runs reached {args.steps} steps ({reached}); run the same command again "
              "to continue them")
        return 0
    bench = [PY, str(ROOT / "bench" / "toy_generation.py"), "--objects", str(args.objects), "--steps",
             str(args.sampling_steps), "--fusion-budget", args.fusion_budget, "--out", str(args.root / "bench"),
             "--jobs", str(args.jobs), "--runs", *[f"{n}={path}" for n, (path, _) in exports.items()]]
    subprocess.run(bench, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((args.root / "bench" / "toy_generation.json").read_text())
    per_run = {n: {**{k: summary["runs"][n].get(k) for k in SCORED}, "seed": runs[n][1], "experiment": ARMS[runs[n][0]]}
               for n in runs}
    per_arm = {}
    for arm in args.arms:
        rows = [per_run[n] for n in runs if runs[n][0] == arm]
        per_arm[arm] = {k: {"mean": float(np.mean(v)), "spread": float(np.ptp(v))}
                        for k in SCORED if (v := [r[k] for r in rows if r[k] is not None])}
    (args.root / "ablation.json").write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": per_run,
                                                         "arms": per_arm, "objects": args.objects}, indent=1))
    print("| arm | " + " | ".join(SCORED) + " |")
    print("|---|" + "---|" * len(SCORED))
    for arm, stats in per_arm.items():
        print(f"| {arm} | " + " | ".join(f"{stats[k]['mean']:.4g} ± {stats[k]['spread'] / 2:.2g}" if k in stats else "—"
                                         for k in SCORED) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
