"""Multi-view consistency without ground truth (`nova3d eval --consistency`).

Generated views have no ground-truth mesh in the wild; MVGBench (ICCV 2025) scores them by
self-consistency instead: fit a 3D representation to one half of the views, render it at the
other half and compare. Here the 3D representation is nova3d's own fusion (nova3d.fuse.fit) and
its mesh (marching cubes, colours projected from the fitted views as `nova3d fuse` exports them),
rendered with nova3d.eval.mesh_render:

  even -> odd   fit views 0, 2, ..., 14; render at 1, 3, ..., 15; compare with those views
  odd -> even   fit views 1, 3, ..., 15; render at 0, 2, ..., 14; compare
  score         the mean of the two directions (every view is held out exactly once)

Per held-out view: PSNR and SSIM of RGB on white (nova3d.eval.appearance, PSNR capped at 100 dB),
the mean angle between rendered and given world-frame normals on pixels both call object, and
the silhouettes' IoU (pixels the fit misses count in PSNR and IoU, not in the normal error).

The fit is plain on purpose: no conflict maps and no pose refinement (CONSISTENCY_FUSION), since
both exist to hide exactly the disagreements this score must see, and the cameras are taken as
cameras.json states them. Its budget is small (64², 128 steps) so an object costs about 45
CPU-seconds; it is a setting (ConsistencySettings) and is written into every result, because
scores at different budgets are not comparable.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.eval.appearance import PSNR_MAX_DB, psnr_per_view, ssim_per_view
from nova3d.eval.mesh_render import MeshData, render_mesh

CONSISTENCY_EXPERIMENT = "fusion/no_conflict"
# The default fit: 64² views, 128 steps of 512 rays with the learning rates decayed to 0.3x (not 0.1x:
# a short fit must still be moving at the end), 512 sparsity points, 64 samples per ray, the toy
# budget's grid (nova3d.demo_parts.TOY_FUSION), no pose refinement, no logs. About 22 CPU-seconds a fit
# on one thread (two fits an object). Clean 64² mug, fit on the even views, scored at the odd ones
# (one thread, 2026-12-07): 100 steps at 0.1x 16.1 dB (still the initial blob), 100 at 0.5x 19.8 dB,
# 160 at 0.3x 22.3 dB (28 CPU-s), 240 at 0.1x 22.8 dB (docs/evaluation.md).
CONSISTENCY_FUSION = ("optim.fit_resolution=64", "optim.steps=128", "optim.rays=512", "optim.warmup_steps=5",
                      "optim.final_lr_factor=0.3", "loss.sparsity_points=512", "render.num_steps=64",
                      "render.occupancy.resolution=32", "optim.pose_refine=false", "field.hashgrid.levels=8",
                      "field.hashgrid.log2_table_size=15", "field.hashgrid.max_resolution=256",
                      "export.resolution=96", "logging.tensorboard=false",
                      "logging.preview_every_n_steps=0", "logging.progress=false")


@dataclass(frozen=True)
class ConsistencySettings:
    experiment: str = CONSISTENCY_EXPERIMENT
    overrides: tuple[str, ...] = CONSISTENCY_FUSION  # applied to the experiment (key=value)
    image_size: int | None = 64  # score at this size, or the views' own where smaller (None: always their own)
    render_supersample: int = 2  # anti-aliased edges, as Blender's renders have


@dataclass
class DirectionScore:
    """One direction: fitted on `fitted`, scored at `held_out` (original view indices)."""

    fitted: list[int]
    held_out: list[int]
    psnr_per_view: list[float]
    ssim_per_view: list[float]
    normal_deg_per_view: list[float | None]  # None: the render and the view share no object pixel
    mask_iou_per_view: list[float]
    seconds: float = 0.0

    @property
    def psnr(self) -> float:
        return float(np.mean(self.psnr_per_view))

    @property
    def ssim(self) -> float:
        return float(np.mean(self.ssim_per_view))

    @property
    def normal_deg(self) -> float | None:
        values = [v for v in self.normal_deg_per_view if v is not None]
        return float(np.mean(values)) if values else None

    @property
    def mask_iou(self) -> float:
        return float(np.mean(self.mask_iou_per_view))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "psnr": self.psnr, "ssim": self.ssim, "normal_deg": self.normal_deg,
                "mask_iou": self.mask_iou}


@dataclass
class ConsistencyResult:
    object_id: str
    folder: str
    directions: list[DirectionScore]
    settings: dict = field(default_factory=dict)  # experiment, overrides, image size: scores depend on them
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: what the wall time would be on an idle core
    image_size: int = 0  # the size the held-out views were scored at

    def _mean(self, name: str) -> float | None:
        values = [getattr(d, name) for d in self.directions]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    @property
    def psnr(self) -> float:
        return self._mean("psnr")

    @property
    def ssim(self) -> float:
        return self._mean("ssim")

    @property
    def normal_deg(self) -> float | None:
        return self._mean("normal_deg")

    @property
    def mask_iou(self) -> float:
        return self._mean("mask_iou")

    def scalars(self) -> dict[str, float | None]:
        return {"consistency_psnr": self.psnr, "consistency_ssim": self.ssim,
                "consistency_normal_deg": self.normal_deg, "consistency_mask_iou": self.mask_iou}

    def to_json(self) -> dict:
        return {"object_id": self.object_id, "folder": self.folder, **self.scalars(), "settings": self.settings,
                "image_size": self.image_size, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                "directions": [d.to_json() for d in self.directions]}


# ---------------------------------------------------------------- the split

def split_views(num_views: int) -> tuple[list[int], list[int]]:
    """(even, odd) view indices; the input view 0 is in the even half."""
    if num_views < 4:
        raise Nova3DError(f"a consistency split needs at least 4 views, got {num_views}")
    return list(range(0, num_views, 2)), list(range(1, num_views, 2))


def view_subset(views, indices: list[int]):
    """The FusionViews of `indices` only, indices[0] first: fusion keeps its first view fixed and
    trusted, so each half is anchored at its own first camera. Normals are world-frame already."""
    from nova3d.fusion.views import FusionViews

    idx = torch.as_tensor(indices, dtype=torch.long)
    cams = dataclasses.replace(views.cameras, normal_frame="world").select(idx)
    return FusionViews(views.object_id, views.rgb[idx], views.normal[idx], views.mask[idx], cams, views.folder)


# ---------------------------------------------------------------- fit one half, render the other

def load_settings_config(settings: ConsistencySettings):
    from nova3d.fuse import load_fusion_config

    return load_fusion_config(settings.experiment, list(settings.overrides))


def fit_mesh(views, cfg) -> MeshData:
    """Fuse `views` (a FusionViews half) and return the coloured mesh, as `nova3d fuse` exports it
    (cleaned, underside cut, colours projected from the views at their refined poses)."""
    from nova3d.fuse import fit, refined_cameras
    from nova3d.fusion.mesh import clean_mesh, color_vertices, extract_mesh
    from nova3d.fusion.underside import cut_unseen
    from nova3d.fusion.view_colors import ViewProjector, projected_color_fn

    fit_res = cfg.optim.fit_resolution
    fit_views = views.downsample(min(fit_res, views.resolution)) if fit_res else views  # never above the views' size
    with tempfile.TemporaryDirectory(prefix="nova3d-consistency-") as tmp:  # Lightning's root dir; nothing kept
        system = fit(fit_views, cfg, Path(tmp))
    e = cfg.export
    mesh = clean_mesh(extract_mesh(system.sdf_fn, system.renderer.bound, e.resolution, e.chunk, progress=False),
                      e.min_component_fraction)
    cams = dataclasses.replace(views.cameras, c2w=refined_cameras(system).c2w)
    mesh, _, _ = cut_unseen(mesh, system.sdf_fn, system.renderer.bound, cams, views.mask, e, system.device,
                            progress=False)
    color_fn = system.color_fn
    if e.color_source == "views":
        color_fn = projected_color_fn(ViewProjector(mesh, views.rgb, cams, None, e.view_colors), system.color_fn)
    color_vertices(mesh, color_fn, e.chunk, device=system.device, progress=False)
    return mesh


def render_at(mesh, cameras, size: int, supersample: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """(rgb [V, 3, S, S] on white, world normals [V, 3, S, S], mask [V, S, S]) of a coloured
    trimesh at `cameras`. Normals go through the same unlit renderer as colours: (n + 1) / 2 as
    vertex colours, decoded and renormalised."""
    from nova3d.eval.mesh_render import as_mesh_data

    data = as_mesh_data(mesh)
    vn = torch.tensor(np.array(mesh.vertex_normals), dtype=torch.float32)
    rgb = render_mesh(data, cameras, size, background=1.0, supersample=supersample)
    nrm = render_mesh(MeshData(data.verts, data.faces, vertex_colors=(vn + 1) / 2), cameras, size,
                      background=0.5, supersample=supersample)
    normal = torch.nn.functional.normalize(nrm.rgb * 2 - 1, dim=1)
    return rgb.rgb, normal, rgb.mask[:, 0]


def score_views(rgb: Tensor, normal: Tensor, mask: Tensor, target_rgb: Tensor, target_normal: Tensor,
                target_mask: Tensor) -> tuple[list[float], list[float], list[float | None], list[float]]:
    """Per view: PSNR (capped), SSIM, mean normal angle in degrees on pixels both masks hold
    (None where there are none), silhouette IoU. Images [V, 3, H, W] in [0, 1]; masks [V, H, W]."""
    psnr = psnr_per_view(rgb.clamp(0, 1), target_rgb, PSNR_MAX_DB).tolist()
    ssim = ssim_per_view(rgb.clamp(0, 1), target_rgb).tolist()
    ours, theirs = mask > 0.5, target_mask > 0.5
    cos = (normal * target_normal).sum(1).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos))
    both = ours & theirs
    normal_deg = [float(angle[v][both[v]].mean()) if both[v].any() else None for v in range(len(angle))]
    union = (ours | theirs).flatten(1).sum(1).clamp_min(1)
    iou = ((ours & theirs).flatten(1).sum(1) / union).tolist()
    return psnr, ssim, normal_deg, iou


def _scored_size(views, settings: ConsistencySettings) -> int:
    if settings.image_size is None:
        return views.resolution
    if settings.image_size < 8:
        raise Nova3DError(f"consistency image size must be at least 8, got {settings.image_size}")
    return min(settings.image_size, views.resolution)


def object_consistency(folder: str | Path, settings: ConsistencySettings = ConsistencySettings(),
                       fitter=None) -> ConsistencyResult:
    """The consistency of one object folder (module docstring). `fitter(views_half) -> trimesh`
    replaces the fusion fit (tests use an oracle mesh); Nova3DError names the file for bad input."""
    from nova3d.fusion.config import fit_budget
    from nova3d.fusion.views import load_views

    t0, c0 = time.perf_counter(), time.process_time()
    views = load_views(folder)  # FusionInputError (a Nova3DError) names the file
    size = _scored_size(views, settings)
    scored = views.downsample(size)
    if fitter is None:
        cfg = fit_budget(load_settings_config(settings), views.resolution)
        fitter = lambda half: fit_mesh(half, cfg)  # noqa: E731
    even, odd = split_views(views.num_views)
    directions = []
    for fitted, held_out in ((even, odd), (odd, even)):
        t1 = time.perf_counter()
        mesh = fitter(view_subset(views, fitted))
        target = view_subset(scored, held_out)
        rgb, normal, mask = render_at(mesh, target.cameras, size, settings.render_supersample)
        scores = score_views(rgb, normal, mask, target.rgb, target.normal, target.mask)
        directions.append(DirectionScore(fitted, held_out, *scores, seconds=time.perf_counter() - t1))
    return ConsistencyResult(views.object_id, str(folder), directions, settings_json(settings),
                             time.perf_counter() - t0, time.process_time() - c0, size)


def settings_json(settings: ConsistencySettings) -> dict:
    return {**dataclasses.asdict(settings), "overrides": list(settings.overrides)}


# ---------------------------------------------------------------- folders

def is_object_folder(folder: Path) -> bool:
    return (folder / schema.CAMERAS_FILE).is_file()


def object_folders(views_dir: str | Path) -> list[Path]:
    """`views_dir` itself when it is an object folder, else its object folders (sorted);
    Nova3DError when there is none."""
    views_dir = Path(views_dir)
    if not views_dir.is_dir():
        raise Nova3DError(f"{views_dir}: views folder not found")
    if is_object_folder(views_dir):
        return [views_dir]
    folders = sorted(p for p in views_dir.iterdir() if p.is_dir() and is_object_folder(p)
                     and not p.name.endswith(schema.TMP_SUFFIX))
    if not folders:
        raise Nova3DError(f"{views_dir / schema.CAMERAS_FILE}: not found, and no subfolder holds one "
                          "(give an object folder or a folder of object folders)")
    return folders
