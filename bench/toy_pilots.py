"""Toy recipe pilots (issue 24): each candidate change against today's recipe, side by side, judged
on generated views of the VAL split (never on the loss alone).

    python bench/toy_pilots.py [--steps 600] [--init pretrained/toy] [--arms baseline mode ...]
                               [--root ~/.cache/nova3d/pilots] [--objects 16] [--jobs 4] [--override k=v ...]

Every arm continues from the same exported pipeline (`model.init_from`, so that short runs compare
a trained model's next steps rather than the chaos of the first ones) for the same number of
training SAMPLES (an arm with batch B gets steps / B optimizer steps), one thread each, seed 0.
Each run is exported (EMA weights) and scored by bench/toy_generation.py --split val --fusion-budget
none: view-0 PSNR, novel-view PSNR / SSIM, normal error, RGB-normal mask IoU. Runs that already
reached their step count are not trained again (the run dir resumes), so the command can be rerun.
Writes ROOT/pilots.json and prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Each arm: overrides of experiments/toy.yaml. "baseline" is today's recipe (the shipped model's).
ARMS: dict[str, list[str]] = {
    "baseline": [],
    "mode": ["system.diffusion_target=mode"],
    "mode_batch4": ["system.diffusion_target=mode", "data.batch_size=4", "system.lr=6e-4", "system.lr_new=6e-4"],
    "mode_sigma_low": ["system.diffusion_target=mode", "system.p_mean=-0.4", "system.p_std=1.4"],
    "mode_cosine": ["system.diffusion_target=mode", "system.lr_schedule=cosine", "system.lr_final_ratio=0.1"],
}


def batch_of(overrides: list[str]) -> int:
    return next((int(o.split("=")[1]) for o in overrides if o.startswith("data.batch_size=")), 1)


def train_and_export(name: str, experiment: str, overrides: list[str], root: Path) -> tuple[Path, float]:
    """`python -m nova3d.train EXPERIMENT OVERRIDES` in ROOT/NAME (one thread; a rerun resumes or skips a
    finished run), then `nova3d export` of its EMA weights to ROOT/NAME/export. Returns (export, seconds)."""
    cmd = [PY, "-m", "nova3d.train", experiment, *overrides, f"logging.root={root / name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(root / f"{name}.log", "a") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{Path(sys.argv[0]).name}: run {name} failed (exit {done.returncode}); see {root / name}.log")
    run = root / name / experiment / "local"
    export = root / name / "export"
    subprocess.run([PY, "-m", "nova3d.cli", "export", str(run), "--out", str(export), "--overwrite"], check=True,
                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return export, time.perf_counter() - start


def train_arm(name: str, overrides: list[str], samples: int, init: Path, root: Path) -> tuple[Path, float]:
    steps = max(1, samples // batch_of(overrides))
    return train_and_export(name, "toy", [
        *overrides, f"model.init_from={init}", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=8", "system.val_num_objects=1",
        f"trainer.checkpoint_every_n_steps={max(1, steps // 4)}", "system.warmup_steps=20"], root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=600, help="training samples per arm (steps at batch 1)")
    p.add_argument("--init", type=Path, default=ROOT / "pretrained" / "toy")
    p.add_argument("--arms", nargs="+", default=[a for a in ARMS if a != "mode_cosine"], choices=list(ARMS))
    p.add_argument("--root", type=Path, default=Path.home() / ".cache" / "nova3d" / "pilots")
    p.add_argument("--objects", type=int, default=16, help="val objects scored")
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--jobs", type=int, default=4, help="arms trained side by side (one thread each)")
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides added to every arm")
    args = p.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        exports = dict(zip(args.arms, pool.map(lambda a: train_arm(a, ARMS[a] + args.override, args.samples, args.init, args.root),
                                               args.arms)))
    runs = [f"{a}={path}" for a, (path, _) in exports.items()]
    bench = [PY, str(ROOT / "bench" / "toy_generation.py"), "--split", "val", "--fusion-budget", "none",
             "--objects", str(args.objects), "--steps", str(args.sampling_steps), "--out", str(args.root / "bench"),
             "--jobs", str(min(args.jobs, len(runs))), "--runs", *runs]
    done = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"toy_pilots: scoring failed: {done.stderr[-2000:]}")
    summary = json.loads((args.root / "bench" / "toy_generation.json").read_text())
    rows = {a: {**summary["runs"][a], "train_seconds": round(exports[a][1]), "overrides": ARMS[a]} for a in args.arms}
    (args.root / "pilots.json").write_text(json.dumps({"samples": args.samples, "init": str(args.init),
                                                       "baselines": summary["baselines"], "arms": rows}, indent=1))
    print(f"| arm | overrides | view-0 PSNR | novel PSNR | SSIM | normal error | mask IoU | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for a, r in rows.items():
        print(f"| {a} | {' '.join(ARMS[a]) or '(today)'} | {r['psnr_view0']:.2f} | {r['psnr_generated']:.2f} | "
              f"{r['ssim_generated']:.3f} | {r['normal_error_deg_generated']:.1f}° | {r['rgb_normal_mask_iou']:.3f} | "
              f"{r['train_seconds']} |")
    base = summary["baselines"]["input_repeated"]
    print(f"| input repeated | | | {base['psnr']:.2f} | {base['ssim']:.3f} | {base['normal_error_deg']:.1f}° | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
