"""`nova3d fuse`: one object folder -> fitted fields -> textured mesh and pictures.

    nova3d fuse --views DIR --out DIR [EXPERIMENT] [key=value ...]     (also `make fuse VIEWS=DIR`)

The out folder gets (staged in OUT.partial and swapped in whole on success, so a failed or killed
fit leaves an earlier result in OUT exactly as it was):
mesh.glb/.obj/.ply, turntable.gif, errors.png (the mesh against its views: where it misses),
conflict_maps.png (+ conflict_maps.npz, the maps as numbers;
only for experiments with conflict maps), cameras_refined.json, metrics.json (flat numbers +
"experiment"), config.yaml, and TensorBoard logs under tensorboard/. A folder made by
`nova3d perturb` carries its true cameras (perturb/cameras_true.json): fusion then also reports
the pose errors before and after refinement. With export.save_field=true the folder also keeps
field.pt (the fitted fields and poses); `--from-field FOLDER/field.pt` then exports it again with
other export.* settings and no fit (the same experiment and overrides as the fit, or it is refused).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch

from nova3d.atomic import atomic_path, check_replaceable, staged_dir, write_json_atomic
from nova3d.cameras import Cameras
from nova3d.config import is_fusion_experiment, load_experiment, to_yaml
from nova3d.errors import Nova3DError
from nova3d.lightning_warnings import quiet_lightning
from nova3d.fusion.config import FusionExperimentConfig, describe_budget, fit_budget
from nova3d.fusion.error_sheet import ERRORS_SHEET, views_error_sheet
from nova3d.fusion.underside import cut_unseen
from nova3d.fusion.view_colors import COLOR_SOURCES, ViewProjector, projected_color_fn
from nova3d.fusion.views import FusionViews, load_views
from nova3d.devices import resolve_device
from nova3d.systems.fusion import FusionSystem, StepCounter

DEFAULT_EXPERIMENT = "fusion/default"
TRUE_CAMERAS = Path("perturb") / "cameras_true.json"  # written by nova3d.fusion.perturb
CONFLICT_RESOLUTION = 128  # conflict maps are rendered at this size (volume rendering is the slow part)
FIELD_FILE = "field.pt"  # export.save_field: the fitted system's state (fields, variance, poses, occupancy)
# Lightning's advice for a step-counting loader and for a tiny model are not about us.
_EXPECTED_WARNINGS = (r".*does not have many workers.*", r".*IterableDataset.*__len__.*",
                      r".*Total length of `DataLoader` across ranks is zero.*")


@dataclass
class FuseResult:
    out_dir: Path
    meshes: dict[str, Path]
    metrics: dict
    system: FusionSystem
    views: FusionViews
    conflict: torch.Tensor | None  # [V, R, R] conflict maps at CONFLICT_RESOLUTION; None without them


def load_fusion_config(experiment: str = DEFAULT_EXPERIMENT, overrides: list[str] | tuple = ()) -> FusionExperimentConfig:
    if not is_fusion_experiment(experiment):
        raise Nova3DError(f"experiment {experiment!r} is not a fusion experiment (use one under experiments/fusion/)")
    cfg = load_experiment(experiment, list(overrides))
    check_choices(cfg, experiment)
    return cfg


def fusion_config_digest(overrides: list[str] | tuple = (), experiment: str = DEFAULT_EXPERIMENT) -> str:
    """A digest of the resolved fusion config: caches of fit results keyed by it go stale when a
    default changes (e.g. export.cut_unseen_top), not only when the overrides do."""
    import hashlib

    return hashlib.sha1(to_yaml(load_fusion_config(experiment, overrides)).encode()).hexdigest()[:12]


def check_choices(cfg: FusionExperimentConfig, experiment: str) -> None:
    """A misspelt option value fails at load time with one line, not steps into a fit."""
    from nova3d.fusion.field import COLOR_VIEW_MODES
    from nova3d.losses.fusion import COLOR_METRICS

    for key, value, allowed in (("field.color_view_mode", cfg.field.color_view_mode, COLOR_VIEW_MODES),
                                ("loss.color_metric", cfg.loss.color_metric, COLOR_METRICS),
                                ("export.color_source", cfg.export.color_source, COLOR_SOURCES)):
        if value not in allowed:
            raise Nova3DError(f"experiment {experiment}: {key} must be one of {list(allowed)}, got {value!r}")


def _trainer(cfg: FusionExperimentConfig, device: torch.device, out_dir: Path) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    from nova3d.progress_bar import StepProgressBar

    log = cfg.logging
    logger = (TensorBoardLogger(save_dir=out_dir, name="tensorboard", version="", default_hp_metric=False)
              if log.tensorboard else False)
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_steps=cfg.optim.steps, precision="32-true", logger=logger, log_every_n_steps=log.log_every_n_steps,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_progress_bar=log.progress, callbacks=[StepProgressBar("fuse", refresh_rate=10)] if log.progress else [],
        default_root_dir=out_dir)


def fit(views: FusionViews, cfg: FusionExperimentConfig, out_dir: Path, true_c2w: torch.Tensor | None = None) -> FusionSystem:
    """Optimise the fields (and poses) for `views`; raises FusionDiverged on NaNs."""
    device = resolve_device(cfg.device)
    L.seed_everything(cfg.seed, verbose=False)
    system = FusionSystem(cfg, views, true_c2w)
    with quiet_lightning(_EXPECTED_WARNINGS):  # + Lightning's srun hint on a local run
        trainer = _trainer(cfg, device, out_dir)
        trainer.fit(system, train_dataloaders=torch.utils.data.DataLoader(StepCounter(cfg.optim.steps), batch_size=None))
    if trainer.global_step < cfg.optim.steps:
        raise Nova3DError(f"{views.folder}: fusion stopped at step {trainer.global_step} of {cfg.optim.steps}")
    return system.to(device).eval()


def load_fitted(views: FusionViews, cfg: FusionExperimentConfig, field_file: str | Path,
                true_c2w: torch.Tensor | None = None) -> FusionSystem:
    """A FusionSystem with the state a fit saved (export.save_field), ready to export: `cfg` must
    build the same fields and poses as the fit's (its export.* settings may differ)."""
    field_file = Path(field_file)
    system = FusionSystem(cfg, views, true_c2w)
    try:
        state = torch.load(field_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Nova3DError(f"{field_file}: no such file (a fit writes it with export.save_field=true)") from None
    except Exception as err:  # torch raises several types for a file that is not a state dict
        raise Nova3DError(f"{field_file}: not a saved fusion field ({type(err).__name__})") from None
    try:
        system.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = next((line for line in lines if not line.startswith("Error(s) in loading")), type(err).__name__)
        raise Nova3DError(f"{field_file}: was fitted with other field or pose settings than these "
                          f"({first[:160]})") from None
    system.renderer.update_step(cfg.optim.steps)  # the end of the fit's schedules (levels, cos anneal)
    return system.to(resolve_device(cfg.device)).eval()


def refined_cameras(system: FusionSystem) -> Cameras:
    c = system.views.cameras
    c2w = system.refined_c2w().detach().cpu()
    extra = {**c.extra, "refined_by": "nova3d fuse (per-view SE(3) corrections)"}
    return dataclasses.replace(c, c2w=c2w, K=c.K.cpu(), extra=extra)


def export_outputs(system: FusionSystem, out_dir: Path, full_views: FusionViews | None = None
                   ) -> tuple[dict[str, Path], torch.Tensor | None, dict]:
    """Mesh files, pictures, refined cameras; returns (meshes, conflict maps or None, stats).
    full_views: the views at their own resolution where the fit ran at a lower one (texture and
    underside then come from their pixels)."""
    from nova3d.eval.appearance import psnr_per_view
    from nova3d.eval.mesh_render import render_mesh
    from nova3d.fusion.mesh import bake_texture, clean_mesh, color_vertices, export_mesh, extract_mesh
    from nova3d.fusion.preview import conflict_sheet, turntable

    cfg, views = system.cfg, system.views
    e = cfg.export
    stats: dict = {}
    conflict = None
    if system.uses_conflict():  # an ablation without conflict maps has none to show (and saves ~20 s)
        t0 = time.perf_counter()
        maps = system.render_views(min(CONFLICT_RESOLUTION, views.resolution))
        conflict = maps.conflict.cpu()
        stats["seconds_conflict_render"] = time.perf_counter() - t0
        stats["conflict_mean"] = float(conflict[1:].mean())
        with atomic_path(out_dir / "conflict_maps.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, conflict=conflict.numpy().astype(np.float16))
        conflict_sheet(maps.rgb.cpu(), conflict, out_dir / "conflict_maps.png")
    cams = refined_cameras(system)
    cams.save(out_dir / "cameras_refined.json")
    full = full_views or views
    full_cams = dataclasses.replace(full.cameras, c2w=cams.c2w)  # refined poses, the full views' intrinsics

    t0 = time.perf_counter()
    bars = cfg.logging.progress  # the export's own bars follow the fit's: a bench asks for a quiet console
    mesh = extract_mesh(system.sdf_fn, system.renderer.bound, e.resolution, e.chunk, progress=bars)
    mesh = clean_mesh(mesh, e.min_component_fraction)
    mesh, low, high = cut_unseen(mesh, system.sdf_fn, system.renderer.bound, full_cams, full.mask, e, system.device,
                                 progress=bars)
    for key, height in (("underside_cut_height", low), ("top_cut_height", high)):
        if height is not None:  # else nothing reached past what the views see on that side
            stats[key] = height
    color_fn = system.color_fn
    if e.color_source == "views":
        projector = ViewProjector(mesh, full.rgb, full_cams, conflict, e.view_colors)
        color_fn = projected_color_fn(projector, system.color_fn)
    color_vertices(mesh, color_fn, e.chunk, device=system.device, progress=bars)
    textured = mesh
    if e.uv_texture:
        textured = bake_texture(mesh, color_fn, e.texture_size, device=system.device, progress=bars)
    meshes = export_mesh(textured, out_dir, "mesh", list(e.formats))
    stats["seconds_mesh_export"] = time.perf_counter() - t0
    stats.update(vertices=int(len(mesh.vertices)), faces=int(len(mesh.faces)))

    # How well the exported mesh explains the views it was fitted to (at the refined poses).
    rendered = render_mesh(mesh, cams, image_size=views.resolution, background=1.0)
    psnr = psnr_per_view(rendered.rgb.clamp(0, 1), views.rgb.cpu())
    stats["psnr_mesh_vs_views"] = float(psnr.mean())
    views_error_sheet(views.rgb.cpu(), rendered.rgb.clamp(0, 1), psnr, out_dir / ERRORS_SHEET)  # where it misses
    turntable(mesh, out_dir / "turntable.gif", frames=cfg.logging.turntable_frames, progress=bars)
    return meshes, conflict, stats


def fuse_object(views_dir: str | Path, out_dir: str | Path, cfg: FusionExperimentConfig | None = None,
                log=None, from_field: str | Path | None = None) -> FuseResult:
    """Fit one object folder and write everything into `out_dir` (see the module docstring).
    optim.budget is resolved for the views' resolution (fit_budget); `log(str)` hears which.
    from_field: no fit; export the state an earlier fit saved (load_fitted) with `cfg`'s export settings."""
    cfg = cfg or load_fusion_config()
    views_dir, out_dir = Path(views_dir), Path(out_dir)
    check_replaceable(out_dir)  # a folder that cannot take the result fails now, not after the fit
    resolve_device(cfg.device)
    full_views = load_views(views_dir)  # every input check happens here, before any optimisation
    cfg = fit_budget(cfg, full_views.resolution)
    if log is not None:
        log(describe_budget(cfg, full_views.resolution))
    views = full_views.downsample(cfg.optim.fit_resolution) if cfg.optim.fit_resolution else full_views
    true_c2w = Cameras.load(views_dir / TRUE_CAMERAS).c2w if (views_dir / TRUE_CAMERAS).is_file() else None
    with staged_dir(out_dir, "nova3d fuse") as stage:
        with atomic_path(stage / "config.yaml") as tmp:
            tmp.write_text(to_yaml(cfg))
        t0 = time.perf_counter()
        system = (fit(views, cfg, stage, true_c2w) if from_field is None
                  else load_fitted(views, cfg, from_field, true_c2w))
        seconds_fit = time.perf_counter() - t0
        if cfg.export.save_field:
            with atomic_path(stage / FIELD_FILE) as tmp:
                torch.save(system.state_dict(), tmp)
        meshes, conflict, stats = export_outputs(system, stage, full_views)
        metrics = {"experiment": cfg.name, "object_id": views.object_id, "steps": cfg.optim.steps,
                   "rays_per_step": cfg.optim.rays, "budget": cfg.optim.budget, "seconds_fit": seconds_fit, **stats,
                   "seconds_total": time.perf_counter() - t0, "device": str(system.device),
                   **({"from_field": str(Path(from_field).resolve())} if from_field is not None else {})}
        metrics.update(system.pose_errors() or {})
        write_json_atomic(stage / "metrics.json", metrics)
    meshes = {fmt: out_dir / path.relative_to(stage) for fmt, path in meshes.items()}
    return FuseResult(out_dir, meshes, metrics, system, views, conflict)
