"""Mesh export cost: the stages of nova3d.fusion.mesh (+ the turntable) on a real fusion field.

    python bench/mesh_export.py [--quick] [--repeats N]

The field is an untrained nova3d.fusion.field.FusionField at its default size (hash grid +
MLPs; "prior" init: exactly a sphere of radius 0.4), so the network costs are those of a fitted
field. Baseline: the dense marching-cubes grid (every one of resolution^3 points through the
SDF network); ours: the coarse-to-fine grid (sample_grid coarse=4). Both meshes are compared.
Medians of --repeats runs (the xatlas bake and the turntable run once: they take longest).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nova3d.fusion.field import FieldConfig, FusionField  # noqa: E402
from nova3d.fusion.mesh import (bake_texture, clean_mesh, color_vertices, export_mesh, extract_mesh,  # noqa: E402
                                sample_grid)
from nova3d.fusion.preview import turntable  # noqa: E402
from timing import timed  # noqa: E402  (bench/timing.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="96^3 grid, 512^2 texture, 12-frame 128^2 turntable")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res, tex, frames, size = (96, 512, 12, 128) if args.quick else (192, 1024, 24, 256)
    torch.manual_seed(0)
    field = FusionField(FieldConfig()).eval()
    bound = field.cfg.bound
    sdf_fn = field.geometry.sdf

    def color_fn(points, normals):
        geo = field.geometry(points, with_grad=False)
        return field.color(points, normals, -normals, geo.feature, None)

    r: dict = {"resolution": res, "texture_size": tex, "threads": args.threads, "repeats": args.repeats}
    r["grid_dense_s"], dense = timed(lambda: sample_grid(sdf_fn, bound, res, coarse=1, progress=False), args.repeats)
    r["grid_coarse_to_fine_s"], sparse = timed(lambda: sample_grid(sdf_fn, bound, res, progress=False), args.repeats)
    r["grid_speedup_vs_dense"] = r["grid_dense_s"] / r["grid_coarse_to_fine_s"]
    r["evaluated_fraction"] = sparse.evaluated / res ** 3
    a = extract_mesh(sdf_fn, bound, res, coarse=1, progress=False)
    r["extract_s"], b = timed(lambda: extract_mesh(sdf_fn, bound, res, progress=False), args.repeats)
    r["same_mesh_as_dense"] = bool(np.array_equal(a.faces, b.faces) and np.allclose(a.vertices, b.vertices))
    r["clean_s"], mesh = timed(lambda: clean_mesh(b, 0.05), args.repeats)
    r["faces"] = int(len(mesh.faces))
    r["color_vertices_s"], _ = timed(lambda: color_vertices(mesh, color_fn, progress=False), args.repeats)
    r["bake_texture_s"], textured = timed(lambda: bake_texture(mesh, color_fn, tex, progress=False), 1)
    with tempfile.TemporaryDirectory() as tmp:
        r["export_vertex_colours_s"], _ = timed(lambda: export_mesh(mesh, tmp, "a"), args.repeats)
        r["export_textured_s"], _ = timed(lambda: export_mesh(textured, tmp, "b"), args.repeats)
        r["turntable_s"], _ = timed(lambda: turntable(mesh, Path(tmp) / "t.gif", frames, size, progress=False), 1)
    r["turntable_frames"], r["turntable_size"] = frames, size
    for k, v in r.items():
        print(f"{k:>26}: {v:.3f}" if isinstance(v, float) else f"{k:>26}: {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
