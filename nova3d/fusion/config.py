"""The config schema of a fusion run (experiments/fusion/*.yaml), loaded like every experiment
by nova3d.config.load_experiment. Defaults are the `fusion/default` recipe: 16 views at 256²
fitted on 2 CPU cores within the issue's five minutes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from nova3d.errors import Nova3DError

from nova3d import number_checks as num
from nova3d.devices import check_device_name
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
    # Oracle supervision of the conflict map (issue 15 §2, fusion/supervised_conflict): weight of a
    # BCE between the rendered conflict and the true corruption masks, read from this folder under
    # the views (what `nova3d perturb` writes). 0: off, the maps learn from the colour error alone.
    conflict_supervision: float = 0.0
    conflict_supervision_masks: str = "perturb/corruption"
    pose: float = 1.0e-2

    def __post_init__(self) -> None:
        for name in ("color", "normal", "mask", "eikonal", "sparsity", "sparsity_scale", "conflict",
                     "conflict_min_error", "conflict_supervision", "pose"):
            num.in_range(f"loss.{name}", getattr(self, name), 0)
        if self.conflict_supervision > 0 and not (self.conflict_maps and self.conflict > 0):
            raise Nova3DError("loss.conflict_supervision needs conflict maps (loss.conflict_maps true, loss.conflict > 0)")
        num.count("loss.sparsity_points", self.sparsity_points)
        num.count("loss.conflict_start_step", self.conflict_start_step, 0)


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
    # Which budget (steps, rays, fit size, grid) fits the views: "auto" picks "small" for views of
    # at most SMALL_VIEWS pixels unless one of the budget's keys was changed, else "full" (this
    # file's defaults, made for 256² views); fit_budget() resolves it once the views are read.
    budget: str = "auto"

    def __post_init__(self) -> None:
        num.count("optim.steps", self.steps)  # 0 steps would export a mesh from an untrained field
        num.count("optim.rays", self.rays)
        num.in_range("optim.object_fraction", self.object_fraction, 0, 1)
        for name in ("lr_grid", "lr_net", "lr_color", "lr_conflict", "lr_variance", "lr_pose"):
            num.positive(f"optim.{name}", getattr(self, name))
        num.in_range("optim.final_lr_factor", self.final_lr_factor, 0, 1, low_open=True)
        for name in ("warmup_steps", "pose_start_step"):
            num.count(f"optim.{name}", getattr(self, name), 0)
        if self.fit_resolution is not None:
            num.count("optim.fit_resolution", self.fit_resolution, 8)
        if self.budget not in BUDGETS:
            raise Nova3DError(f"optim.budget must be one of {list(BUDGETS)}, got {self.budget!r}")


@dataclass
class FusionLoggingConfig:
    tensorboard: bool = True
    log_every_n_steps: int = 25
    preview_every_n_steps: int = 250  # rendered vs target views and conflict maps in TensorBoard
    preview_resolution: int = 64
    turntable_frames: int = 24
    progress: bool = True

    def __post_init__(self) -> None:
        num.count("logging.log_every_n_steps", self.log_every_n_steps)
        num.count("logging.preview_every_n_steps", self.preview_every_n_steps, 0)
        num.count("logging.preview_resolution", self.preview_resolution, 8)
        num.count("logging.turntable_frames", self.turntable_frames)


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

    def __post_init__(self) -> None:
        """Numbers of the parts this schema does not define itself, and the device's form."""
        num.seed("seed", self.seed, num.LIGHTNING_SEED_MAX)
        check_device_name(self.device, "device")
        num.count("export.resolution", self.export.resolution, 8)
        num.count("export.chunk", self.export.chunk)
        num.count("export.texture_size", self.export.texture_size, 8)
        num.in_range("export.min_component_fraction", self.export.min_component_fraction, 0, 1)
        num.count("render.num_steps", self.render.num_steps)
        num.count("render.chunk", self.render.chunk)


# The budget for small views (the toy model's 64²): fit at 64² with a grid that resolves it, 240
# steps with the pose and conflict start steps scaled to them (nova3d.demo's TOY_FUSION, measured
# there: ~25 s on 2 CPU cores instead of ~120 s for the full budget on the same views).
SMALL_VIEWS = 96  # views of at most this many pixels (square) get SMALL_BUDGET under optim.budget=auto
SMALL_BUDGET = ("optim.fit_resolution=64", "optim.steps=240", "optim.rays=512", "optim.pose_start_step=40",
                "loss.conflict_start_step=80", "loss.conflict=16", "field.hashgrid.levels=8",
                "field.hashgrid.log2_table_size=15", "field.hashgrid.max_resolution=256", "export.resolution=96")
BUDGETS = ("auto", "full", "small")


def _key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _changed_budget_keys(cfg: "FusionExperimentConfig") -> set[str]:
    """SMALL_BUDGET's keys whose value in `cfg` is not the schema default (an experiment file,
    an override or code chose them)."""
    from omegaconf import OmegaConf

    mine, default = OmegaConf.structured(cfg), OmegaConf.structured(FusionExperimentConfig)
    return {k for k in map(_key, SMALL_BUDGET) if OmegaConf.select(mine, k) != OmegaConf.select(default, k)}


def fit_budget(cfg: "FusionExperimentConfig", resolution: int) -> "FusionExperimentConfig":
    """`cfg` with optim.budget resolved for views of `resolution` pixels. "auto" is "small" for
    views of at most SMALL_VIEWS pixels when none of the budget's keys was changed from the
    default, else "full". "small" sets SMALL_BUDGET's keys that are still at their defaults (so
    applying it twice changes nothing); "full" keeps the config's values."""
    from omegaconf import OmegaConf

    changed = _changed_budget_keys(cfg)
    budget = cfg.optim.budget
    if budget == "auto":
        budget = "small" if resolution <= SMALL_VIEWS and not changed else "full"
    items = [b for b in SMALL_BUDGET if _key(b) not in changed] if budget == "small" else []
    items = [f"optim.fit_resolution={min(64, resolution)}" if _key(b) == "optim.fit_resolution" else b
             for b in items]  # never above the views' own size
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist([*items, f"optim.budget={budget}"]))
    return OmegaConf.to_object(merged)


def describe_budget(cfg: "FusionExperimentConfig", resolution: int) -> str:
    """One line for the console: the budget a resolved config uses (fit_budget)."""
    o = cfg.optim
    return (f"fusion: {o.budget} budget for {resolution}² views ({o.steps} steps x {o.rays} rays at "
            f"{o.fit_resolution or resolution}²; small is used for views up to {SMALL_VIEWS}² unless "
            "optim.budget=full or a budget key is set)")
