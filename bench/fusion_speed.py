"""Fusion speed: wall seconds and peak memory for one object, 16 views at 256² (issue 4 §4).

    python bench/fusion_speed.py [--quick] [--object torus_knot] [--repeats 3] [--device cpu|cuda]

Two measurements in the same run:
  full      `nova3d fuse` with fusion/default (fit + mesh export + pictures), median of --repeats;
  per-step  ms per training step of fusion/default against the baseline recipe it replaced
            (instant-NGP-sized hash grid 16 levels / 2^19 rows / 2048 cells, NeuS's inv_s = 20
            start, 256 samples across the cube), median over the same steps of each.
Targets (issue 4): CPU <= 300 s, GPU <= 30 s. The last output line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from fusion_quality import render_object  # noqa: E402
from nova3d.fuse import fuse_object, load_fusion_config  # noqa: E402
from nova3d.fusion.poses import rays_for_pixels  # noqa: E402
from nova3d.fusion.views import load_views  # noqa: E402
from nova3d.systems.fusion import FusionSystem  # noqa: E402

BASELINE = ["field.hashgrid.levels=16", "field.hashgrid.log2_table_size=19", "field.hashgrid.max_resolution=2048",
            "field.sh_degree=4", "render.variance_init=0.3", "render.num_steps=256"]


def step_times(folder: Path, overrides: list[str], steps: int, device: str) -> list[float]:
    """Seconds of each of `steps` plain training steps (render, losses, backward, Adam)."""
    cfg = load_fusion_config("fusion/default", overrides + [f"device={device}"])
    system = FusionSystem(cfg, load_views(folder)).to(device)
    system.on_fit_start()
    optimizer = system.configure_optimizers()["optimizer"]
    times = []
    for step in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        system.renderer.update_step(step)
        rays = system.sampler.sample(cfg.optim.rays, system.generator)
        o, d = rays_for_pixels(system.refined_c2w(step)[rays.view], system.K[rays.view], rays.pix)
        out = system.renderer(o, d, rays.view)
        terms, weights = system.loss_terms(out, rays, step), system.loss_weights()
        optimizer.zero_grad()
        sum(weights[k] * v for k, v in terms.items()).backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 full run at 128², 20 timed steps")
    parser.add_argument("--object", default="torus_knot")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "fusion_speed"))
    args = parser.parse_args()
    root = Path(args.out)
    folder = render_object(args.object, root / "renders")
    repeats = 1 if args.quick else args.repeats
    overrides = ["logging.progress=false", f"device={args.device}"] + (["optim.fit_resolution=128"] if args.quick else [])

    totals, fits = [], []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            result = fuse_object(folder, Path(tmp) / "out", load_fusion_config("fusion/default", overrides))
        totals.append(result.metrics["seconds_total"])
        fits.append(result.metrics["seconds_fit"])
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None

    n = 20 if args.quick else 60
    ours = step_times(folder, [], n, args.device)[5:]  # the first steps include the occupancy set-up
    base = step_times(folder, BASELINE, n, args.device)[5:]
    summary = {"benchmark": "fusion_speed", "object": args.object, "device": args.device, "quick": args.quick,
               "threads": torch.get_num_threads(), "repeats": repeats,
               "seconds_total_median": statistics.median(totals), "seconds_fit_median": statistics.median(fits),
               "seconds_total_all": totals, "peak_rss_gb": peak_rss_gb, "peak_gpu_gb": peak_gpu_gb,
               "ms_per_step_default": 1000 * statistics.median(ours),
               "ms_per_step_baseline": 1000 * statistics.median(base),
               "speedup_vs_baseline": statistics.median(base) / statistics.median(ours),
               "target_seconds": 30 if args.device.startswith("cuda") else 300}
    summary["passed"] = summary["seconds_total_median"] <= summary["target_seconds"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
