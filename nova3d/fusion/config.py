"""The config schema of a fusion run (experiments/fusion/*.yaml), loaded like every experiment
by nova3d.config.load_experiment. Defaults are the `fusion/default` recipe: 16 views at 256²
fitted on 2 CPU cores within the issue's five minutes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from nova3d.fusion.field import FieldConfig
from nova3d.fusion.hashgrid import HashGridConfig
from nova3d.fusion.mesh import MeshExportConfig
from nova3d.fusion.render import RenderConfig


def cpu_sized_field() -> FieldConfig:
    """Instant-NGP's grid (16 levels up to 2048, 2^19 rows) is 12M parameters whose Adam update
    alone costs ~0.1 s a step on a CPU; 10 levels up to 512 cells still resolve a 256² view
    (the field's cube spans ~380 pixels) at 1.5M parameters and ~2.2x the samples/s. View
    dependence of degree 2: renders and generated views are nearly diffuse, and higher degrees
    extrapolate into colour blotches at export. One colour field for every view
    (color_view_mode "none"): with a per-view embedding as a colour-net input ("mlp") each
    view explains away its own disagreements, so conflict maps cannot find them (AUROC 0.37
    at the demo budget), and a per-view colour transform ("affine") explains away drift
    (AUROC 0.52); docs/benchmarks.md "Fusion quality"."""
    return FieldConfig(hashgrid=HashGridConfig(levels=10, log2_table_size=17, max_resolution=512), sh_degree=2,
                       color_view_mode="none")


def sharp_start_render() -> RenderConfig:
    """NeuS starts at inv_s = 20 (variance 0.3); with normal and mask supervision the surface
    forms at once, and starting at inv_s ~ 150 (0.5) cuts samples per ray from ~70 to ~12
    through occupancy pruning and early termination: ~10x faster steps at the start (measured)."""
    return RenderConfig(num_steps=128, variance_init=0.5)


@dataclass
class FusionLossConfig:
    """Weights of the logged loss terms (0 switches a term off) and their few knobs."""

    color: float = 1.0
    color_metric: str = "l1"  # per-ray colour error: "l1" or "mse" (nova3d.losses.fusion.color_error)
    normal: float = 0.5
    mask: float = 0.5
    eikonal: float = 0.1
    sparsity: float = 0.01
    sparsity_scale: float = 100.0  # R_sparse = exp(-scale |sdf|) at random points
    sparsity_points: int = 2048
    # Conflict maps: lambda of nova3d.losses.fusion (the per-ray L1 colour error at which a ray
    # is ignored entirely; the conflict net learns c = min(1, expected error / lambda)) is
    # `conflict` x the batch's median error on object rays, at least `conflict_min_error`: a
    # ray conflicts when its view disagrees with the others much more than is typical at the
    # current stage of training. 0 or `conflict_maps: false` = no conflict. 64: clean rays keep
    # their weight at sharp colour edges too (texture PSNR vs no_conflict on CLEAN views, full
    # budget: block_tower -1.37 / -0.43 / -0.18 dB at 16 / 32 / 64, torus_knot -0.35 / +0.08 at
    # 16 / 64) while large disagreements are still discounted; the maps rank pixels alike from 4
    # to 64 (AUROC 0.94-0.95, docs/benchmarks.md "Fusion quality").
    conflict: float = 64.0
    conflict_min_error: float = 0.02
    conflict_maps: bool = True
    conflict_start_step: int = 200  # the colour error means little before geometry has formed
    pose: float = 1.0e-2


@dataclass
class FusionOptimConfig:
    steps: int = 600
    rays: int = 1024  # per step
    object_fraction: float = 0.5  # share of each batch drawn from the (dilated) object region
    lr_grid: float = 1.0e-2  # hash-grid tables (instant-NGP / instant-nsr-pl scale)
    lr_net: float = 1.0e-3  # SDF MLP
    lr_color: float = 3.0e-3  # colour MLP and view embeddings (colour converges slower than shape)
    lr_conflict: float = 1.0e-2  # the conflict logit must travel ~3 units (from 5% up) within a few hundred steps
    lr_variance: float = 1.0e-2  # sharpness must follow the surface within a short schedule
    lr_pose: float = 3.0e-3  # 1e-3 left 54% of a <= 5 deg rotation error after 300 steps, 3e-3 41%
    warmup_steps: int = 10
    final_lr_factor: float = 0.1  # exponential decay to lr * factor at the last step
    pose_refine: bool = True
    # Move cameras along their viewing axis too? Off: that distance trades off against the
    # object's scale, and left free the cameras drifted outwards (camera-centre error 0.018 ->
    # 0.041 with it, 0.019 without; nova3d.fusion.poses.PoseRefiner).
    pose_refine_depth: bool = False
    pose_start_step: int = 100  # corrections stay at zero until the geometry has a rough shape
    fit_resolution: Optional[int] = None  # None: fit at the views' own resolution


@dataclass
class FusionLoggingConfig:
    tensorboard: bool = True
    log_every_n_steps: int = 25
    preview_every_n_steps: int = 250  # rendered vs target views and conflict maps in TensorBoard
    preview_resolution: int = 64
    turntable_frames: int = 24
    progress: bool = True


@dataclass
class FusionExperimentConfig:
    name: str = "fusion/default"
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    field: FieldConfig = dataclasses.field(default_factory=cpu_sized_field)
    render: RenderConfig = dataclasses.field(default_factory=sharp_start_render)
    loss: FusionLossConfig = dataclasses.field(default_factory=FusionLossConfig)
    optim: FusionOptimConfig = dataclasses.field(default_factory=FusionOptimConfig)
    export: MeshExportConfig = dataclasses.field(default_factory=MeshExportConfig)
    logging: FusionLoggingConfig = dataclasses.field(default_factory=FusionLoggingConfig)
