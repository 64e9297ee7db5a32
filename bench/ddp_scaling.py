"""DDP scaling of training: samples/s of EXP=tiny with 1 vs 2 CPU processes, and the efficiency.

    python bench/ddp_scaling.py [--quick] [--gpu]

Runs the real entry point (`python -m tests.slurm_probe` = nova3d.train plus a callback that
timestamps every step) on synthetic shards: EXP=tiny (tiny random UNet, 64², 4 views), batch 1
per rank, one thread per process; the 2-process run is Lightning's own DDP launcher on CPU
(gloo), the same code path srun uses minus SLURM. Throughput = ranks x batch / median step time
(rank 0, warm-up steps dropped); the baseline is the 1-process run of the same repeat; scaling
efficiency = samples/s(2) / (2 x samples/s(1)). The median over repeats is reported.
--gpu adds steps/s of a mid-size config on one GPU (SVD-xt architecture, random weights, 256²,
8 views, bf16, gradient checkpointing). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repo root: tests/ helpers

from data_prep.write_shards import write_shards  # noqa: E402
from tests.helpers_objects import make_object_folder  # noqa: E402

WARMUP_STEPS = 2  # first steps include lazy init and allocator warm-up


def make_shards(root: Path, views: int, res: int, count: int = 4) -> Path:
    for i in range(count):
        make_object_folder(root / "renders", f"obj{i}", views=views, res=res, seed=i)
    write_shards(root / "renders", root / "shards", max_count=1, progress=False)  # one shard per object
    return root / "shards"


def run(shards: Path, root: Path, ranks: int, steps: int, extra: list[str], accelerator: str = "cpu") -> dict:
    """One training run; returns its median step time and samples/s (rank 0's step timestamps)."""
    probe = Path(tempfile.mkdtemp(dir=root))
    overrides = ["model.pretrained=null", f"data.train_shards={shards}", "data.num_workers=0",
                 "data.batch_size=1", "data.samples_per_epoch=1000", f"trainer.accelerator={accelerator}",
                 f"trainer.devices={ranks}", "trainer.strategy=" + ("ddp" if ranks > 1 else "auto"),
                 f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                 "trainer.val_check_interval=100000", "trainer.checkpoint_every_n_steps=100000",
                 "trainer.log_every_n_steps=1000", f"logging.root={probe / 'runs'}",
                 *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NOVA3D_PROBE_DIR=str(probe), GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tests.slurm_probe", "tiny", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"training run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (probe / "rank0.jsonl").read_text().splitlines()]
    times = [r["t"] for r in records if r["event"] == "step"]
    intervals = [b - a for a, b in zip(times, times[1:])][WARMUP_STEPS - 1:]
    step_s = statistics.median(intervals)
    return {"step_ms": 1000 * step_s, "samples_per_s": ranks / step_s, "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat of 12 steps (a few minutes when loaded)")
    parser.add_argument("--gpu", action="store_true", help="also time a mid-size config on one CUDA GPU")
    args = parser.parse_args()
    repeats, steps = (1, 12) if args.quick else (3, 30)
    figures: dict = {"bench": "ddp_scaling", "experiment": "tiny", "resolution": 64, "views": 4,
                     "batch_per_rank": 1, "threads_per_process": 1, "steps": steps, "warmup_steps": WARMUP_STEPS,
                     "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root / "cpu", views=4, res=64)
        per = {1: [], 2: []}
        for rep in range(repeats):
            for ranks in (1, 2):
                result = run(shards, root, ranks, steps, [])
                per[ranks].append(result)
                print(f"repeat {rep}: {ranks} process(es): {result['samples_per_s']:.2f} samples/s, "
                      f"{result['step_ms']:.0f} ms/step ({result['wall_s']:.0f} s wall)", flush=True)
        efficiency = [b["samples_per_s"] / (2 * a["samples_per_s"]) for a, b in zip(per[1], per[2])]
        for ranks in (1, 2):
            figures[f"samples_per_s_{ranks}proc"] = round(statistics.median(r["samples_per_s"] for r in per[ranks]), 3)
            figures[f"step_ms_{ranks}proc"] = round(statistics.median(r["step_ms"] for r in per[ranks]), 1)
        figures["speedup_2_vs_1"] = round(figures["samples_per_s_2proc"] / figures["samples_per_s_1proc"], 3)
        figures["scaling_efficiency"] = round(statistics.median(efficiency), 3)
        if args.gpu:
            import torch

            if not torch.cuda.is_available():
                figures["gpu"] = "no CUDA device"
            else:
                gpu_shards = make_shards(root / "gpu", views=16, res=256)
                mid = ["model.architecture=svd_xt", "model.gradient_checkpointing=true", "data.resolution=256",
                       "data.num_views=8", "trainer.precision=bf16-mixed"]
                result = run(gpu_shards, root, 1, steps, mid, accelerator="gpu")
                figures["gpu"] = {"device": torch.cuda.get_device_name(0), "config": mid,
                                  "steps_per_s": round(1000 / result["step_ms"], 3), "step_ms": round(result["step_ms"], 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
