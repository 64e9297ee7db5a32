"""The config schema of a fusion run (experiments/fusion/*.yaml), loaded like every experiment
by nova3d.config.load_experiment. Defaults are the `fusion/default` recipe: 16 views at 256²
fitted on 2 CPU cores within the issue's five minutes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from nova3d.fusion.field import FieldConfig
from nova3d.fusion.mesh import MeshExportConfig
from nova3d.fusion.render import RenderConfig


@dataclass
class FusionLossConfig:
    """Weights of the logged loss terms (0 switches a term off) and their few knobs."""

    color: float = 1.0
    normal: float = 0.5
    mask: float = 0.5
    eikonal: float = 0.1
    sparsity: float = 0.01
    sparsity_scale: float = 100.0  # R_sparse = exp(-scale |sdf|) at random points
    sparsity_points: int = 2048
    # Conflict maps: lambda of nova3d.losses.fusion (the per-ray L1 colour error a view may show
    # before the conflict map starts to discount it). 0 or `conflict_maps: false` = no conflict.
    conflict: float = 0.04
    conflict_maps: bool = True
    conflict_start_step: int = 200  # the colour error means little before geometry has formed
    pose: float = 1.0e-2


@dataclass
class FusionOptimConfig:
    steps: int = 1000
    rays: int = 2048  # per step
    object_fraction: float = 0.5  # share of each batch drawn from the (dilated) object region
    lr_grid: float = 1.0e-2  # hash-grid tables (instant-NGP / instant-nsr-pl scale)
    lr_net: float = 1.0e-3  # SDF and colour MLPs, view embeddings
    lr_conflict: float = 1.0e-3
    lr_variance: float = 1.0e-3
    lr_pose: float = 1.0e-3
    warmup_steps: int = 50
    final_lr_factor: float = 0.1  # exponential decay to lr * factor at the last step
    pose_refine: bool = True
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
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    render: RenderConfig = dataclasses.field(default_factory=RenderConfig)
    loss: FusionLossConfig = dataclasses.field(default_factory=FusionLossConfig)
    optim: FusionOptimConfig = dataclasses.field(default_factory=FusionOptimConfig)
    export: MeshExportConfig = dataclasses.field(default_factory=MeshExportConfig)
    logging: FusionLoggingConfig = dataclasses.field(default_factory=FusionLoggingConfig)
