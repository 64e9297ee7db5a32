"""Seconds per object of the GSO evaluation: geometry metrics and appearance metrics.

    python bench/eval_speed.py [--quick] [--repeats N] [--threads N] [--device cpu|cuda]

The pair: procedural `crate` (UV-textured, like GSO meshes) subdivided to ~49k faces (--quick:
~12k), normalised to the unit box, as GT (views rendered by tests/helpers_eval.py at the GSO
protocol's 16 views, 256², on white) and a perturbed copy (vertex noise, 3% scale, a small turn)
as the prediction. Each step is timed on its own, every repeat, and the median reported:
  geometry:   CD from 100k surface points (cKDTree on CPU), CD from depth renders (SyncDreamer
              variant, optional in the protocol), Volume IoU 64³
  appearance: render 16 views at 256² (the CPU default "torch" rasteriser), PSNR + SSIM,
              LPIPS-VGG when its weights are cached (never downloaded; else reported unavailable)
  end_to_end: nova3d.eval.protocol.evaluate_object with the gso protocol (reads the GT folder
              and mesh files, normalises, all default metrics)
Baseline, in the same run: pytorch3d's MeshRasterizer (the reference backend; its CPU kernel is
naive: ~20 s per view at 12k faces) rendering view 0 once, times 16: "render_ratio_vs_pytorch3d"
= torch / pytorch3d.
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from data_prep.procedural import make_object  # noqa: E402
from nova3d.cameras import Cameras  # noqa: E402
from nova3d.eval import appearance, geometry  # noqa: E402
from nova3d.eval.mesh_render import render_mesh  # noqa: E402
from nova3d.eval.protocol import GT_MESH, PROTOCOLS, evaluate_object, load_gt, load_mesh  # noqa: E402
from nova3d.mesh_io import load_mesh as load_mesh_file, save_mesh  # noqa: E402
from tests.helpers_eval import write_gt_object  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)


def make_pair(root: Path, subdivisions: int) -> tuple[Path, Path]:
    """(GT folder, prediction file) of the benchmark object."""
    mesh = make_object("crate")
    for _ in range(subdivisions):
        mesh = mesh.subdivide()
    proto = PROTOCOLS["gso"]
    folder = write_gt_object(root / "gt", "crate", mesh, views=proto.num_views, res=proto.image_size,
                             elevation_deg=proto.elevation_deg)
    pred = load_mesh_file(folder / GT_MESH)
    rng = np.random.default_rng(0)
    pred.vertices = np.asarray(pred.vertices) * 1.03 + rng.normal(0, 0.004, pred.vertices.shape)
    pred.apply_transform(trimesh.transformations.rotation_matrix(np.radians(3), [0, 0, 1]))
    path = root / "pred" / "crate.glb"
    path.parent.mkdir(parents=True)
    save_mesh(pred, path)
    return folder, path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~12k faces instead of ~49k")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (nearest neighbours, nvdiffrast, LPIPS)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or 3
    proto = PROTOCOLS["gso"]
    backend = "torch" if args.device == "cpu" else "nvdiffrast"
    with tempfile.TemporaryDirectory() as tmp:
        folder, pred_path = make_pair(Path(tmp), 5 if args.quick else 6)
        gt = load_gt(folder, proto)
        pred = load_mesh(pred_path)
        cams: Cameras = gt.cameras
        print(f"mesh: {len(pred.faces)} faces, {len(cams)} views at {proto.image_size}², device {args.device}, "
              f"{args.threads} thread(s), {repeats} repeats", flush=True)
        lpips_fn, lpips_reason = appearance.load_lpips(proto.lpips_net, args.device)
        r: dict = {}
        r["cd_surface_s"], cd = timed(lambda: geometry.chamfer_surface(pred, gt.mesh, proto.chamfer_points,
                                                                       device=args.device), repeats)
        r["cd_depth_s"], _ = timed(lambda: geometry.chamfer_depth(pred, gt.mesh, cams, proto.image_size,
                                                                  device=args.device, backend=backend), repeats)
        r["iou_s"], iou = timed(lambda: geometry.volume_iou(pred, gt.mesh, proto.iou_resolution), repeats)
        r["render_s"], out = timed(lambda: render_mesh(pred, cams, proto.image_size, backend=backend), repeats)
        r["psnr_ssim_s"], app = timed(lambda: appearance.appearance_metrics(out.rgb, gt.views, lpips=None), repeats)
        if lpips_fn is not None:
            r["lpips_s"], _ = timed(lambda: lpips_fn(out.rgb, gt.views), repeats)
        r["end_to_end_s"], res = timed(lambda: evaluate_object(pred_path, folder, proto, lpips_fn=lpips_fn,
                                                               device=args.device, backend=backend), repeats)
        one = cams.select([0])
        p3d, _ = timed(lambda: render_mesh(pred, one, proto.image_size, backend="pytorch3d"), 1)
        r["baseline_pytorch3d_render_16_views_s"] = p3d * len(cams)
        print(f"CD {cd.chamfer:.4f}, IoU {iou.iou:.3f}, PSNR {app.psnr:.2f}, SSIM {app.ssim:.3f}; "
              f"end-to-end status {res.status}", flush=True)
        for k, v in r.items():
            print(f"  {k:40s} {v:8.3f}", flush=True)
    result = {
        "bench": "eval_speed", "quick": args.quick, "device": args.device, "threads": args.threads,
        "repeats": repeats, "faces": int(len(pred.faces)), "views": len(cams), "image_size": proto.image_size,
        "chamfer_points": proto.chamfer_points, "iou_resolution": proto.iou_resolution,
        **{k: round(v, 4) for k, v in r.items()},
        "geometry_s_per_object": round(r["cd_surface_s"] + r["iou_s"], 4),
        "geometry_with_depth_cd_s_per_object": round(r["cd_surface_s"] + r["iou_s"] + r["cd_depth_s"], 4),
        "appearance_s_per_object": round(r["render_s"] + r["psnr_ssim_s"] + r.get("lpips_s", 0.0), 4),
        "render_ratio_vs_pytorch3d": round(r["render_s"] / r["baseline_pytorch3d_render_16_views_s"], 4),
        "lpips": "computed" if lpips_fn is not None else f"unavailable: {lpips_reason}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
