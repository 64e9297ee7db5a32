"""Toy recipe: generated views and meshes fused from them against the truth, beside trivial baselines.

    python bench/toy_generation.py [--data data/toy] [--runs toy=pretrained/toy NAME=PIPELINE_DIR ...]
                                   [--objects 20] [--steps 12] [--seed 0] [--quick] [--out outputs/toy_bench]

For every test-split object with a GT mesh (data_prep.toy_data) and every run (a pipeline folder,
`nova3d export` of a toy-recipe checkpoint): its input view (view 0 of the Blender render) ->
Nova3DPipeline (fixed seed) -> 16 RGB + 16 normal views, scored against the renders by
nova3d.eval.generated_views (PSNR / SSIM, normal angular error on the true foreground, RGB-normal
foreground IoU; means over the 15 novel views), beside the trivial baselines `input_repeated` and
`train_mean` scored the same way; then `fusion/default` at the toy budget (nova3d.demo.TOY_FUSION)
fuses the generated views and the GSO protocol (64² views) scores the mesh against the GT mesh
(Chamfer, Volume IoU).

Writes OUT/<run>/metrics.json + OUT/<run>/eval/ (what `nova3d report` reads), OUT/report.md
(`nova3d report`'s table of the runs) and OUT/toy_generation.json; the last line printed is one
JSON object with psnr_generated, psnr_baseline (the better baseline), normal_error_deg_generated,
normal_error_deg_baseline, rgb_normal_mask_iou, chamfer_fused, iou_fused, objects (of the first
run), and ablation: {run: the same keys}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nova3d.atomic import write_json_atomic  # noqa: E402
from nova3d.data.shards import read_object_folder  # noqa: E402
from nova3d.eval import generated_views as gv  # noqa: E402

KEYS = ("psnr_generated", "psnr_baseline", "normal_error_deg_generated", "normal_error_deg_baseline",
        "rgb_normal_mask_iou", "chamfer_fused", "iou_fused", "objects")
TRAIN_MEAN_OBJECTS = 200


def test_objects(data: Path, count: int) -> list[Path]:
    """The first `count` test-split render folders that have a GT mesh."""
    from data_prep.gso import GT_MESH

    folders = sorted(p for p in (data / "renders" / "test").iterdir() if (p / GT_MESH).is_file())
    if not folders:
        raise SystemExit(f"toy_generation: no test objects with a GT mesh under {data}/renders/test "
                         "(run `make toy-data`)")
    return folders[:count]


def train_mean(data: Path, count: int = TRAIN_MEAN_OBJECTS) -> gv.Views:
    folders = sorted((data / "renders" / "train").iterdir())[:count]
    return gv.mean_views([gv.Views.from_sample(read_object_folder(f)) for f in folders])


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def bench_run(name: str, model: Path, objects: list[Path], baselines: dict[str, list[gv.ViewScores]],
              out: Path, steps: int, seed: int, fusion: tuple[str, ...]) -> dict:
    from nova3d.demo import score_mesh
    from nova3d.eval.protocol import get_protocol, protocol_overrides, versions
    from nova3d.eval.results import EvalSummary
    from nova3d.fuse import fuse_object, load_fusion_config
    from nova3d.generate import GenerateSettings, generate_into, load_pipeline

    pipe = load_pipeline(model, torch.device("cpu"))
    protocol = get_protocol("gso", image_size=pipe.config.resolution, lpips=False)
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    scores, results, per_object, gen_seconds, fuse_seconds = [], [], [], [], []
    for folder in objects:
        true = gv.Views.from_sample(read_object_folder(folder))
        t = time.perf_counter()
        views_dir = generate_into(pipe, true.rgb[0], run_dir / "views", folder.name,
                                  GenerateSettings(steps=steps, seed=seed, progress=False), model,
                                  {"image": str(folder / "rgb" / "000.png")})
        gen_seconds.append(time.perf_counter() - t)
        s = gv.score_views(gv.Views.from_sample(read_object_folder(views_dir)), true)
        scores.append(s)
        t = time.perf_counter()
        fused = fuse_object(views_dir, run_dir / "fused" / folder.name, load_fusion_config("fusion/default", list(fusion)))
        fuse_seconds.append(time.perf_counter() - t)
        result = score_mesh(fused.meshes["glb"], folder, None, protocol, (None, "LPIPS off in this bench"))
        results.append(result)
        mesh = result.scalars()
        per_object.append({"object": folder.name, **s.means(), "chamfer": mesh["chamfer"],
                           "volume_iou": mesh["volume_iou"], "mesh_psnr": mesh["psnr"], "status": result.status})
        print(f"  {name} {folder.name}: PSNR {s.mean('psnr'):.2f} dB, normals {s.mean('normal_error_deg'):.1f} deg, "
              f"mask IoU {s.mean('mask_iou'):.3f}, CD {mesh['chamfer'] or float('nan'):.4f}, "
              f"IoU {mesh['volume_iou'] or float('nan'):.3f} (generate {gen_seconds[-1]:.0f} s, "
              f"fuse {fuse_seconds[-1]:.0f} s)", flush=True)
    EvalSummary(protocol=dataclasses.asdict(protocol), protocol_overrides=protocol_overrides(protocol), objects=results,
                lpips_reason="LPIPS off in this bench", versions=versions(), environment={"device": "cpu"},
                pred_dir=str(run_dir / "fused"), gt_dir=str(objects[0].parent),
                seconds=float(sum(r.seconds for r in results))).write(run_dir / "eval")
    best_psnr = max(baselines, key=lambda b: _mean([s.mean("psnr") for s in baselines[b]]))
    best_normal = min(baselines, key=lambda b: _mean([s.mean("normal_error_deg") for s in baselines[b]]))
    row = {
        "psnr_generated": _mean([s.mean("psnr") for s in scores]),
        "ssim_generated": _mean([s.mean("ssim") for s in scores]),
        "psnr_baseline": _mean([s.mean("psnr") for s in baselines[best_psnr]]),
        "psnr_baseline_name": best_psnr,
        "normal_error_deg_generated": _mean([s.mean("normal_error_deg") for s in scores]),
        "normal_error_deg_baseline": _mean([s.mean("normal_error_deg") for s in baselines[best_normal]]),
        "normal_baseline_name": best_normal,
        "rgb_normal_mask_iou": _mean([s.mean("mask_iou") for s in scores]),
        "chamfer_fused": _mean([o["chamfer"] for o in per_object]),
        "iou_fused": _mean([o["volume_iou"] for o in per_object]),
        "objects": len(objects),
        "psnr_per_view": np.mean([s.psnr for s in scores], axis=0).round(3).tolist(),
        "normal_error_deg_per_view": np.nanmean([s.normal_error_deg for s in scores], axis=0).round(3).tolist(),
        "seconds_generate_median": float(np.median(gen_seconds)), "seconds_fuse_median": float(np.median(fuse_seconds)),
        "model": str(model), "steps": steps, "seed": seed,
    }
    write_json_atomic(run_dir / "metrics.json", {"experiment": name, **{k: v for k, v in row.items()
                                                                        if isinstance(v, (int, float))}})
    write_json_atomic(run_dir / "per_object.json", per_object)
    return row


def main(argv: list[str] | None = None) -> int:
    from nova3d.demo import QUICK_TOY_FUSION, TOY_FUSION
    from nova3d.eval.report import build_report, write_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "toy")
    p.add_argument("--runs", nargs="+", default=[f"toy={ROOT / 'pretrained' / 'toy'}"], metavar="NAME=DIR")
    p.add_argument("--objects", type=int, default=20)
    p.add_argument("--steps", type=int, default=12, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_bench")
    p.add_argument("--quick", action="store_true", help="4 objects, 6 steps, a tiny fusion budget")
    p.add_argument("--jobs", type=int, default=1, help="runs scored side by side, one thread each")
    p.add_argument("--fusion-budget", choices=["toy", "quick"], default="toy",
                   help="toy: nova3d.demo.TOY_FUSION (~60 s an object); quick: QUICK_TOY_FUSION (~15 s)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = dict(r.split("=", 1) for r in args.runs)
    count, steps = (4, 6) if args.quick else (args.objects, args.steps)
    fusion = QUICK_TOY_FUSION if args.quick or args.fusion_budget == "quick" else TOY_FUSION
    objects = test_objects(args.data, count)
    mean = train_mean(args.data)
    baselines = {"input_repeated": [], "train_mean": []}
    for folder in objects:
        true = gv.Views.from_sample(read_object_folder(folder))
        baselines["input_repeated"].append(gv.score_views(gv.input_repeated(true), true))
        baselines["train_mean"].append(gv.score_views(mean, true))
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, Path(model), objects, baselines, args.out, steps, args.seed, fusion) for name, model in runs.items()]
    print(f"runs {', '.join(runs)} on {len(objects)} test objects", flush=True)
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            rows = dict(zip(runs, pool.map(bench_run, *zip(*jobs))))
    else:
        rows = {job[0]: bench_run(*job) for job in jobs}
    report = build_report([args.out / n for n in runs], metrics=["eval/chamfer", "eval/volume_iou", "psnr_*",
                                                                 "normal_error_*", "rgb_normal_mask_iou"])
    write_report(report, args.out / "report.md")
    first = rows[next(iter(runs))]
    summary = {**{k: first[k] for k in KEYS}, "baselines": {b: {"psnr": _mean([s.mean("psnr") for s in v]),
                                                                "ssim": _mean([s.mean("ssim") for s in v]),
                                                                "normal_error_deg": _mean([s.mean("normal_error_deg")
                                                                                           for s in v])}
                                                            for b, v in baselines.items()},
               "ablation": {n: {k: r[k] for k in KEYS} for n, r in rows.items()}, "runs": rows,
               "quick": args.quick, "fusion": list(fusion)}
    write_json_atomic(args.out / "toy_generation.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
