"""Toy recipe: generated views and meshes fused from them against the truth, beside trivial baselines.

    python bench/toy_generation.py [--data data/toy] [--runs toy=pretrained/toy NAME=PIPELINE_DIR ...]
                                   [--objects 20] [--steps 12] [--seed 0] [--quick] [--out outputs/toy_bench]
                                   [--fusion-budget toy|quick|none] [--split test|val] [--jobs N] [--reference-only]

For every test-split object with a GT mesh (data_prep.toy_data) and every run (a pipeline folder,
`nova3d export` of a toy-recipe checkpoint): its input view (view 0 of the Blender render) ->
Nova3DPipeline (fixed seed) -> 16 RGB + 16 normal views, scored against the renders by
nova3d.eval.generated_views (PSNR / SSIM, normal angular error on the true foreground, RGB-normal
foreground IoU; means over the 15 novel views; view 0's PSNR apart), beside the trivial baselines
`input_repeated` and `train_mean` scored the same way; then `fusion/default` at the toy budget
(nova3d.demo_parts.TOY_FUSION) fuses the generated views and the GSO protocol (64² views) scores the mesh
against the GT mesh (Chamfer, Volume IoU). The reference is the same fusion on the TRUE renders of the
same objects (OUT/true_views/, computed once and reused while objects and fusion settings agree).
`--split val --fusion-budget none` scores views only, on the split recipes are chosen on (pilots).

Writes OUT/<run>/metrics.json + OUT/<run>/eval/ (what `nova3d report` reads), OUT/report.md
(`nova3d report`'s table of the runs) and OUT/toy_generation.json; the last line printed is one
JSON object with KEYS (of the first run: psnr_generated, ssim_generated, psnr_view0, psnr_baseline
(the better baseline), normal errors, rgb_normal_mask_iou, chamfer_fused, iou_fused,
chamfer_true_views, iou_true_views, objects), and ablation: {run: the same keys}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nova3d.atomic import check_writable, staged_folder, write_json_atomic  # noqa: E402
from nova3d.data.shards import read_object_folder  # noqa: E402
from nova3d.errors import Nova3DError  # noqa: E402
from nova3d.eval import generated_views as gv  # noqa: E402

KEYS = ("psnr_generated", "ssim_generated", "psnr_view0", "psnr_baseline", "normal_error_deg_generated",
        "normal_error_deg_baseline", "rgb_normal_mask_iou", "chamfer_fused", "iou_fused", "chamfer_true_views",
        "iou_true_views", "objects")
PROTOCOL = "nova3d"  # meshes scored as stored, in the GT renders' frame: scale and placement errors count
TRUE_VIEWS = "true_views"  # OUT/true_views: the same fusion on the true renders (the reference)
TRAIN_MEAN_OBJECTS = 200


def split_objects(data: Path, count: int, split: str = "test") -> list[Path]:
    """The first `count` render folders of `split`; on the test split, only those with a GT mesh."""
    from data_prep.gt_mesh import GT_MESH

    root = data / "renders" / split
    folders = sorted(p for p in root.iterdir() if split != "test" or (p / GT_MESH).is_file()) if root.is_dir() else []
    if not folders:
        raise SystemExit(f"toy_generation: no {split} objects{' with a GT mesh' if split == 'test' else ''} "
                         f"under {root} (run `make toy-data`)")
    return folders[:count]


def train_mean(data: Path, count: int = TRAIN_MEAN_OBJECTS) -> gv.Views:
    folders = sorted((data / "renders" / "train").iterdir())[:count]
    return gv.mean_views([gv.Views.from_sample(read_object_folder(f)) for f in folders])


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def fuse_and_score_mesh(views_dir: Path, out_dir: Path, gt_folder: Path, fusion: tuple[str, ...], protocol):
    """`fusion/default` with the `fusion` overrides on one views folder, scored against the GT object."""
    from nova3d.demo_parts import score_mesh
    from nova3d.fuse import fuse_object, load_fusion_config

    fused = fuse_object(views_dir, out_dir, load_fusion_config("fusion/default", list(fusion)))
    return score_mesh(fused.meshes["glb"], gt_folder, None, protocol, (None, "LPIPS off in this bench"))


def true_views_reference(objects: list[Path], out: Path, fusion: tuple[str, ...], resolution: int) -> dict:
    """The same fusion on the TRUE renders of the same objects: what the chain could reach with perfect
    views. Kept in OUT/true_views/reference.json and reused while the objects and the resolved fusion
    config (overrides and defaults) are the same."""
    import json as _json

    from nova3d.eval.protocol import get_protocol
    from nova3d.fuse import fusion_config_digest

    key = {"objects": [f.name for f in objects], "fusion": list(fusion), "config": fusion_config_digest(fusion),
           "resolution": resolution, "protocol": PROTOCOL}
    cache = out / TRUE_VIEWS / "reference.json"
    if cache.is_file():
        stored = _json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored
    protocol = get_protocol(PROTOCOL, image_size=resolution, lpips=False)
    per_object = []
    for folder in objects:
        # One file per object: a reference cut off part-way (about a minute an object) resumes there.
        done = out / TRUE_VIEWS / "objects" / f"{folder.name}.json"
        object_key = {k: v for k, v in key.items() if k != "objects"}
        if done.is_file() and (stored := _json.loads(done.read_text())).get("key") == object_key:
            per_object.append(stored["result"])
            continue
        t = time.perf_counter()
        result = fuse_and_score_mesh(folder, out / TRUE_VIEWS / "fused" / folder.name, folder, fusion, protocol).scalars()
        per_object.append({"object": folder.name, "chamfer": result["chamfer"], "volume_iou": result["volume_iou"]})
        done.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(done, {"key": object_key, "result": per_object[-1]})
        print(f"  true views {folder.name}: CD {result['chamfer'] or float('nan'):.4f}, "
              f"IoU {result['volume_iou'] or float('nan'):.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    reference = {"key": key, "per_object": per_object, "chamfer": _mean([o["chamfer"] for o in per_object]),
                 "volume_iou": _mean([o["volume_iou"] for o in per_object])}
    write_json_atomic(cache, reference)
    return reference


_PIPELINES: dict = {}  # per process: a worker of the object pool loads each model once


def _pipeline(model: Path):
    from nova3d.generate import load_pipeline

    if model not in _PIPELINES:
        _PIPELINES[model] = load_pipeline(model, torch.device("cpu"))
    return _PIPELINES[model]


def bench_object(name: str, model: Path, folder: Path, run_dir: Path, steps: int, seed: int,
                 fusion: tuple[str, ...] | None, protocol) -> tuple:
    """One object: generate its views, score them, fuse and score the mesh (with `fusion`).
    Returns (view scores, mesh result or None, per-object row, generate seconds, fuse seconds or None)."""
    from nova3d.generate import GenerateSettings, generate_into

    pipe = _pipeline(model)
    true = gv.Views.from_sample(read_object_folder(folder))
    t = time.perf_counter()
    views_dir = generate_into(pipe, true.rgb[0], run_dir / "views", folder.name,
                              GenerateSettings(steps=steps, seed=seed, progress=False), model,
                              {"image": str(folder / "rgb" / "000.png")})
    gen_seconds = time.perf_counter() - t
    s = gv.score_views(gv.Views.from_sample(read_object_folder(views_dir)), true)
    mesh, result, fuse_seconds = {"chamfer": None, "volume_iou": None, "psnr": None}, None, None
    if fusion is not None:
        t = time.perf_counter()
        result = fuse_and_score_mesh(views_dir, run_dir / "fused" / folder.name, folder, fusion, protocol)
        fuse_seconds = time.perf_counter() - t
        mesh = result.scalars()
    row = {"object": folder.name, **s.means(), "psnr_view0": s.psnr[0], "chamfer": mesh["chamfer"],
           "volume_iou": mesh["volume_iou"], "mesh_psnr": mesh["psnr"]}
    print(f"  {name} {folder.name}: PSNR {s.mean('psnr'):.2f} dB (view 0 {s.psnr[0]:.2f}), normals "
          f"{s.mean('normal_error_deg'):.1f} deg, mask IoU {s.mean('mask_iou'):.3f}, "
          f"CD {mesh['chamfer'] or float('nan'):.4f}, IoU {mesh['volume_iou'] or float('nan'):.3f} "
          f"(generate {gen_seconds:.0f} s{f', fuse {fuse_seconds:.0f} s' if fuse_seconds else ''})", flush=True)
    return s, result, row, gen_seconds, fuse_seconds


def bench_run(name: str, model: Path, objects: list[Path], baselines: dict[str, list[gv.ViewScores]],
              out: Path, steps: int, seed: int, fusion: tuple[str, ...] | None, workers: int = 1) -> dict:
    """Generate + score views of every object; with `fusion`, also fuse and score the meshes.
    workers > 1: objects side by side in that many processes of one thread each."""
    from nova3d.eval.protocol import get_protocol, protocol_overrides, versions
    from nova3d.eval.results import EvalSummary

    protocol = get_protocol(PROTOCOL, image_size=_pipeline(model).config.resolution, lpips=False)
    # Written in OUT/NAME.partial and swapped in whole at the end: a failed or killed run keeps the last one.
    with staged_folder(out / name) as run_dir:
        done = _bench_objects([(name, model, folder, run_dir, steps, seed, fusion, protocol) for folder in objects],
                              workers)
        scores = [d[0] for d in done]
        results = [d[1] for d in done if d[1] is not None]
        per_object = [d[2] for d in done]
        gen_seconds = [d[3] for d in done]
        fuse_seconds = [d[4] for d in done if d[4] is not None]
        if results:
            EvalSummary(protocol=dataclasses.asdict(protocol), protocol_overrides=protocol_overrides(protocol),
                        objects=results, lpips_reason="LPIPS off in this bench", versions=versions(),
                        environment={"device": "cpu"}, pred_dir=str(out / name / "fused"),
                        gt_dir=str(objects[0].parent),
                        seconds=float(sum(r.seconds for r in results))).write(run_dir / "eval")
        best_psnr = max(baselines, key=lambda b: _mean([s.mean("psnr") for s in baselines[b]]))
        best_normal = min(baselines, key=lambda b: _mean([s.mean("normal_error_deg") for s in baselines[b]]))
        row = {
            "psnr_generated": _mean([s.mean("psnr") for s in scores]),
            "ssim_generated": _mean([s.mean("ssim") for s in scores]),
            "psnr_view0": _mean([s.psnr[0] for s in scores]),
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
            "seconds_generate_median": float(np.median(gen_seconds)),
            "seconds_fuse_median": float(np.median(fuse_seconds)) if fuse_seconds else None,
            "model": str(model), "steps": steps, "seed": seed,
        }
        write_json_atomic(run_dir / "metrics.json", {"experiment": name, **{k: v for k, v in row.items()
                                                                            if isinstance(v, (int, float))}})
        write_json_atomic(run_dir / "per_object.json", per_object)
        return row


def _bench_objects(args: list[tuple], workers: int) -> list[tuple]:
    """bench_object over `args`, in `workers` processes of one thread each when workers > 1."""
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(bench_object, *zip(*args)))
    return [bench_object(*a) for a in args]


def main(argv: list[str] | None = None) -> int:
    from nova3d.hub_noise import quiet_hub_libraries

    with quiet_hub_libraries():  # diffusers' loading bars and cast warnings: one progress line per object instead
        return run_bench(argv)


def run_bench(argv: list[str] | None = None) -> int:
    from nova3d.demo_parts import QUICK_TOY_FUSION, TOY_FUSION
    from nova3d.eval.report import build_report, write_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "toy")
    p.add_argument("--runs", nargs="+", default=[f"toy={ROOT / 'pretrained' / 'toy'}"], metavar="NAME=DIR")
    p.add_argument("--objects", type=int, default=20)
    p.add_argument("--steps", type=int, default=12, help="sampling steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "toy_bench")
    p.add_argument("--quick", action="store_true", help="4 objects, 6 steps, a tiny fusion budget")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs scored side by side, one thread each (one run: its objects)")
    p.add_argument("--fusion-budget", choices=["toy", "quick", "none"], default="toy",
                   help="toy: nova3d.demo_parts.TOY_FUSION (~60 s an object); quick: QUICK_TOY_FUSION (~15 s); "
                        "none: score the generated views only")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="val: the split recipes are chosen on (views only: val objects have no GT mesh)")
    p.add_argument("--reference-only", action="store_true",
                   help="compute (or find) OUT/true_views, the same fusion on the true renders, and stop")
    args = p.parse_args(argv)
    if args.split != "test" and args.fusion_budget != "none":
        p.error("--split val scores views only: add --fusion-budget none")
    if args.reference_only and args.fusion_budget == "none":
        p.error("--reference-only needs a fusion budget (toy or quick)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = {} if args.reference_only else dict(r.split("=", 1) for r in args.runs)
    try:  # every model loads and the data is there before anything in OUT is touched
        for model in runs.values():
            _pipeline(Path(model))
        check_writable(args.out)
    except Nova3DError as err:
        print(f"toy_generation: error: {err}", file=sys.stderr)
        return 2
    count, steps = (4, 6) if args.quick else (args.objects, args.steps)
    fusion = (None if args.fusion_budget == "none" else
              QUICK_TOY_FUSION if args.quick or args.fusion_budget == "quick" else TOY_FUSION)
    objects = split_objects(args.data, count, args.split)
    resolution = gv.Views.from_sample(read_object_folder(objects[0])).rgb.shape[-1]
    if args.reference_only:
        reference = true_views_reference(objects, args.out, fusion, resolution)
        print(json.dumps({k: reference[k] for k in ("chamfer", "volume_iou")}))
        return 0
    mean = train_mean(args.data)
    baselines = {"input_repeated": [], "train_mean": []}
    for folder in objects:
        true = gv.Views.from_sample(read_object_folder(folder))
        baselines["input_repeated"].append(gv.score_views(gv.input_repeated(true), true))
        baselines["train_mean"].append(gv.score_views(mean, true))
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, Path(model), objects, baselines, args.out, steps, args.seed, fusion) for name, model in runs.items()]
    print(f"runs {', '.join(runs)} on {len(objects)} {args.split} objects", flush=True)
    reference = {}
    if fusion is not None:
        reference = true_views_reference(objects, args.out, fusion, resolution)
    if args.jobs > 1 and len(jobs) == 1:  # one run: its objects side by side
        rows = {jobs[0][0]: bench_run(*jobs[0], workers=args.jobs)}
    elif args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            rows = dict(zip(runs, pool.map(bench_run, *zip(*jobs))))
    else:
        rows = {job[0]: bench_run(*job) for job in jobs}
    for row in rows.values():
        row["chamfer_true_views"], row["iou_true_views"] = reference.get("chamfer"), reference.get("volume_iou")
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
               "quick": args.quick, "fusion": list(fusion or []), "split": args.split}
    write_json_atomic(args.out / "toy_generation.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
