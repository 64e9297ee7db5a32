"""Does the ground-truth-free consistency score (nova3d.eval.consistency) rank views as it should?

    python bench/consistency_ranking.py --out DIR [key=value ...] [--objects mug torus_knot ...]
                                        [--resolution 64] [--rotation DEG]

Per procedural object: Blender renders (data_prep, 16 views), the same folder through `nova3d
perturb` (colour corruption of views 3, 6, 10, 13; optional pose error), and a shuffled-view folder
(the non-input views' images given to the wrong cameras: a permutation without fixed points).
Each is scored by `object_consistency` at the same fusion budget (key=value overrides add to
nova3d.eval.consistency.CONSISTENCY_FUSION). Expected: clean > perturbed > shuffled on PSNR and
SSIM, and shuffled worst on the normal error. DIR gets renders/, perturbed/, shuffled/ (kept and
reused) and ranking.json + ranking.md (staged: replaced only once complete); the markdown table
is printed, and the exit status is 1 when an object breaks the expected order.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nova3d.atomic import check_writable, staged_entries, write_json_atomic  # noqa: E402
from nova3d.data.object_folder import write_object_sample  # noqa: E402
from nova3d.data.shards import read_object_folder  # noqa: E402
from nova3d.errors import Nova3DError  # noqa: E402
from nova3d.eval.consistency import CONSISTENCY_FUSION, ConsistencySettings, object_consistency  # noqa: E402

OBJECTS = ("mug", "torus_knot", "block_tower")
VARIANTS = ("clean", "perturbed", "shuffled")  # the expected order, best first


def shuffle_views(src: str | Path, dst: str | Path, seed: int = 0) -> list[int]:
    """Copy object folder `src` to `dst` with the non-input views' images (RGB, normal, mask, depth)
    at the wrong cameras: view i of `dst` holds the images of view order[i] of `src`, order[0] = 0
    and order[i] != i otherwise; cameras.json is unchanged. Returns order."""
    sample = read_object_folder(src)
    V = len(sample.cameras)
    rng = np.random.default_rng(seed)
    rest = np.arange(1, V)
    while True:  # a derangement of the non-input views: every one of them is wrong
        perm = rng.permutation(rest)
        if not (perm == rest).any():
            break
    order = np.concatenate([[0], perm])  # stored view i shows what camera order[i] saw
    meta = {**sample.meta, "settings": {**sample.meta.get("settings", {}), "shuffled_from": str(Path(src).resolve()),
                                        "shuffle_order": order.tolist()}}
    take = lambda a: None if a is None else np.ascontiguousarray(a[order])  # noqa: E731
    out = dataclasses.replace(sample, rgba=take(sample.rgba), normal=take(sample.normal), mask=take(sample.mask),
                              depth=take(sample.depth), meta=meta)
    write_object_sample(out, dst, overwrite=True)
    return order.tolist()


def prepare(name: str, root: Path, resolution: int, samples: int, rotation: float) -> dict[str, Path]:
    """The three folders of one object (each made once, then reused)."""
    from data_prep.render_io import RenderSettings, collect_sources
    from data_prep.render_views import render_objects
    from nova3d.fusion.perturb import PerturbConfig, perturb_object

    source = collect_sources([], [name])[0]
    clean = root / "renders" / source.object_id
    if not (clean / "cameras.json").is_file():
        summary = render_objects([source], root / "renders", RenderSettings(resolution=resolution, samples=samples),
                                 progress=False)
        if summary.failed:
            raise Nova3DError(f"{clean}: Blender render failed: {summary.failed[0]['reason']}")
    folders = {"clean": clean, "perturbed": root / "perturbed" / source.object_id,
               "shuffled": root / "shuffled" / source.object_id}
    if not (folders["perturbed"] / "cameras.json").is_file():
        perturb_object(clean, folders["perturbed"], PerturbConfig(pose_rotation_deg=rotation), overwrite=True)
    if not (folders["shuffled"] / "cameras.json").is_file():
        shuffle_views(clean, folders["shuffled"])
    return folders


def in_order(scores: dict[str, dict]) -> dict[str, bool]:
    """Per metric: does it rank clean > perturbed > shuffled (normal error: clean, perturbed < shuffled)?"""
    p = [scores[v]["consistency_psnr"] for v in VARIANTS]
    s = [scores[v]["consistency_ssim"] for v in VARIANTS]
    n = [scores[v]["consistency_normal_deg"] for v in VARIANTS]
    return {"psnr": p[0] > p[1] > p[2], "ssim": s[0] > s[1] > s[2],
            "normal": None not in n and max(n[0], n[1]) < n[2]}


def markdown(rows: list[dict], settings: ConsistencySettings) -> str:
    lines = ["| object | folder | PSNR ↑ | SSIM ↑ | normal error ↓ (°) | mask IoU ↑ | CPU-s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for v in VARIANTS:
            s = row["scores"][v]
            nd = "—" if s["consistency_normal_deg"] is None else f"{s['consistency_normal_deg']:.1f}"
            lines.append(f"| {row['object']} | {v} | {s['consistency_psnr']:.2f} | {s['consistency_ssim']:.3f} | "
                         f"{nd} | {s['consistency_mask_iou']:.3f} | {s['cpu_seconds']:.0f} |")
    verdicts = [f"{r['object']}: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in r["in_order"].items())
                for r in rows]
    lines += ["", "In order (clean > perturbed > shuffled): " + "; ".join(verdicts),
        "", f"Fusion: `{settings.experiment}` with {' '.join(settings.overrides)}; scored at {settings.image_size}²."]
    return "\n".join(lines) + "\n"


def run(objects: list[str], out: Path, resolution: int = 64, samples: int = 8, rotation: float = 0.0,
        settings: ConsistencySettings = ConsistencySettings(), log=print) -> list[dict]:
    """Score every object's three folders; writes out/ranking.json and ranking.md; returns the rows."""
    from data_prep.render_io import collect_sources

    check_writable(out)
    collect_sources([], list(objects))  # an unknown name fails now (one line), not after the first objects
    rows = []
    for name in objects:
        folders = prepare(name, out, resolution, samples, rotation)
        scores = {}
        for variant, folder in folders.items():
            result = object_consistency(folder, settings)
            scores[variant] = {**result.scalars(), "seconds": result.seconds, "cpu_seconds": result.cpu_seconds}
            log(f"{name} {variant}: PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.3f}, normals "
                f"{result.normal_deg if result.normal_deg is None else round(result.normal_deg, 1)}°, "
                f"{result.seconds:.0f} s ({result.cpu_seconds:.0f} CPU-s)")
        rows.append({"object": name, "folders": {k: str(v) for k, v in folders.items()}, "scores": scores,
                     "in_order": in_order(scores)})
    with staged_entries(out, "ranking") as stage:
        write_json_atomic(stage / "ranking.json", {"settings": {**dataclasses.asdict(settings),
                                                                 "resolution": resolution, "rotation_deg": rotation},
                                                    "rows": rows})
        (stage / "ranking.md").write_text(markdown(rows, settings))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="working folder (renders are kept and reused)")
    ap.add_argument("--objects", nargs="+", default=list(OBJECTS), help="procedural object names")
    ap.add_argument("--resolution", type=int, default=64, help="render size (views are scored at 64²)")
    ap.add_argument("--samples", type=int, default=8, help="Cycles samples per pixel")
    ap.add_argument("--rotation", type=float, default=0.0, help="also perturb the poses by up to this (degrees)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="fusion key=value overrides added to CONSISTENCY_FUSION")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    settings = ConsistencySettings(overrides=(*CONSISTENCY_FUSION, *args.overrides))
    try:
        rows = run(args.objects, Path(args.out), args.resolution, args.samples, args.rotation, settings)
    except Nova3DError as err:
        print(f"consistency_ranking: error: {err}", file=sys.stderr)
        return 2
    print(markdown(rows, settings), end="")
    print(json.dumps({"rows": rows}))
    return 0 if all(r["in_order"]["psnr"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
