"""The pieces both demos (nova3d.demo, nova3d.demo_chain) and the benches share: the fusion budgets
that fit `make demo`'s minutes, the Blender ground truth of a procedural object, and the GSO-protocol
score of one mesh. Kept apart so that the two demos do not import each other."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch

from nova3d.errors import Nova3DError

# The one place the demo's fusion budget is set: three fits + exports of 16 views must fit, with the
# renders and evaluation, in `make demo`'s 10 minutes on 2 shared CPU cores (measured: ~100 s a run with
# 1 thread at load ~3, docs/benchmarks.md). Budget only: fewer, cheaper steps (fit at 96², the conflict
# maps are rendered at that size too; a hash grid of 8 levels / 2^15 rows), with the pose and conflict
# start steps scaled to the shorter schedule (fusion/default: 100 and 200 of 600 steps), and the
# conflict lambda at 16 x the median error instead of 64: in only 160 conflict steps the stronger pull of
# lambda = 64 towards c = 0 on clean rays kept the maps at ~0 (largest value 0.04, AUROC 0.74,
# 2026-11-25); at 16 they form (AUROC 0.79) for ~0.1 dB of texture.
DEMO_FUSION = ("optim.fit_resolution=96", "optim.steps=240", "optim.rays=512", "optim.pose_start_step=40",
               "loss.conflict_start_step=80", "loss.conflict=16", "field.hashgrid.levels=8",
               "field.hashgrid.log2_table_size=15",
               "field.hashgrid.max_resolution=256", "export.resolution=128", "logging.preview_every_n_steps=0",
               "logging.progress=false")
QUICK_FUSION = ("optim.fit_resolution=64", "optim.steps=60", "optim.rays=256", "optim.warmup_steps=2",
                "optim.pose_start_step=20", "loss.conflict_start_step=20", "field.hashgrid.levels=6",
                "field.hashgrid.log2_table_size=14", "field.hashgrid.max_resolution=128", "render.num_steps=64",
                "render.occupancy.resolution=32", "export.resolution=64", "logging.turntable_frames=8",
                "logging.preview_every_n_steps=0", "logging.progress=false")
# The toy chain's fusion budget (nova3d.demo_chain, bench/toy_generation.py): 64² generated views, so
# the fit runs at 64² with a grid that resolves it; three fits + exports within the demo's minutes.
TOY_FUSION = ("optim.fit_resolution=64", "optim.steps=240", "optim.rays=512", "optim.pose_start_step=40",
              "loss.conflict_start_step=80", "loss.conflict=16", "field.hashgrid.levels=8",
              "field.hashgrid.log2_table_size=15", "field.hashgrid.max_resolution=256", "export.resolution=96",
              "logging.preview_every_n_steps=0", "logging.progress=false")
QUICK_TOY_FUSION = (*QUICK_FUSION, "logging.tensorboard=false")
RENDER_RESOLUTION, RENDER_SAMPLES = 256, 8


def render_ground_truth(name: str, gt_root: str | Path, resolution: int = RENDER_RESOLUTION,
                        samples: int = RENDER_SAMPLES, progress: bool = True, max_outside: float | None = None) -> Path:
    """Render procedural object `name` with Blender (16 views, depth on) into gt_root/<name>/ and
    write its GT mesh.glb in the renders' normalised frame; kept if already there. Returns the folder.
    max_outside: data_prep.gt_mesh's check of the mesh against the masks (None: its default)."""
    from data_prep.gt_mesh import GT_MESH, MAX_OUTSIDE, write_gt_mesh
    from data_prep.render_io import ObjectSource, RenderSettings, collect_sources
    from data_prep.render_views import render_objects
    from data_prep.procedural import export_object

    source = collect_sources([], [name])[0]  # Nova3DError for an unknown name
    folder = Path(gt_root) / source.object_id
    if not (folder / GT_MESH).is_file():
        settings = RenderSettings(resolution=resolution, samples=samples, depth=True)
        summary = render_objects([source], gt_root, settings, progress=progress)
        if summary.failed:
            raise Nova3DError(f"{folder}: Blender render failed: {summary.failed[0]['reason']}")
        with tempfile.TemporaryDirectory() as tmp:  # the renderer's geometry, contact faces inside removed
            mesh_file = export_object(name, Path(tmp) / f"{name}.glb", solid=True)
            try:
                write_gt_mesh(ObjectSource(source.object_id, source.source, path=mesh_file), folder,
                              MAX_OUTSIDE if max_outside is None else max_outside)
            except ValueError as err:
                raise Nova3DError(f"{folder / GT_MESH}: {err}") from err
    return folder


def score_mesh(mesh_path: str | Path, gt_folder: str | Path, out_dir: str | Path | None, protocol=None,
               lpips: tuple | None = None) -> "ObjectResult":  # noqa: F821
    """The GSO protocol on one mesh against one GT object folder; with out_dir, the result is
    written there as `nova3d eval` writes a set (summary.json, per_object.csv, summary.md).
    lpips: appearance.load_lpips()'s (function, reason), loaded here when None."""
    from nova3d.eval import geometry
    from nova3d.eval.appearance import load_lpips
    from nova3d.eval.protocol import PROTOCOLS, evaluate_object, protocol_overrides, versions
    from nova3d.eval.results import EvalSummary

    protocol = protocol or PROTOCOLS["nova3d"]
    if lpips is None:
        lpips = load_lpips(protocol.lpips_net) if protocol.lpips else (None, "LPIPS disabled by the protocol")
    result = evaluate_object(mesh_path, gt_folder, protocol, lpips_fn=lpips[0])
    if out_dir is not None:
        EvalSummary(protocol=dataclasses.asdict(protocol), protocol_overrides=protocol_overrides(protocol),
                    objects=[result], lpips_reason=lpips[1], versions=versions(),
                    environment={"device": "cpu", "render_backend": protocol.render_backend,
                                 "nn_backend": geometry.nn_backend("cpu"), "torch_threads": torch.get_num_threads()},
                    pred_dir=str(Path(mesh_path).parent), gt_dir=str(Path(gt_folder).parent),
                    seconds=result.seconds).write(out_dir)
    return result
