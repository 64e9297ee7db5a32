"""NeuS volume rendering of a FusionField with fixed-step marching and occupancy pruning.

Rays (world frame, unit directions) are clipped to the field's cube and sampled at a fixed
step dt = 2 * sqrt(3) * bound / num_steps (num_steps samples would cross the cube's
diagonal), jittered per ray when training. Samples outside occupied cells are dropped before
any network runs. The kept samples are evaluated packed ([S] = all kept samples of the
batch, `ray_indices` says whose), then scattered into a padded [N, K] layout for the
transmittance cumprod. Alpha is NeuS's section-point estimate with a learned sharpness
inv_s (Wang et al. 2021; instant-nsr-pl `get_alpha`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from nova3d.fusion.field import FusionField
from nova3d.fusion.occupancy import OccupancyConfig, OccupancyGrid


@dataclass
class RenderConfig:
    num_steps: int = 256  # samples across the cube's diagonal: dt ~ 0.01 for bound 0.75
    stratified: bool = True  # one random offset per ray while training; midpoints in eval
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # white, used when none is passed
    variance_init: float = 0.3  # inv_s = exp(10 * v): 20 at init, as NeuS / instant-nsr-pl
    cos_anneal_end: int = 0  # steps over which NeuS's cos annealing reaches 1; 0 = off
    occupancy: OccupancyConfig | None = field(default_factory=OccupancyConfig)  # None: no pruning
    # Per-ray pruning (early termination): a gradient-free SDF pass over the kept samples
    # estimates transmittance (cos from neighbouring samples, as NeuS's up-sampling) and
    # drops samples behind T < early_stop_eps (nerfacc's default). 0 disables the pass.
    early_stop_eps: float = 1e-4
    # Below this sharpness T behind a surface (~exp(-inv_s * depth)) rarely reaches the eps
    # inside an object, so the pass would cost ~20% and prune nothing (measured at init).
    early_stop_min_inv_s: float = 50.0
    trusted_view: int | None = 0  # this view's conflict is reported as 0 (the input view)
    chunk: int = 4096  # rays per chunk in render_chunked


@dataclass
class RenderOutput:
    """Per ray [N, ...]; per kept sample [S, ...] (None from render_chunked)."""

    rgb: Tensor  # [N, 3] composited over the background
    normal: Tensor  # [N, 3] world frame, weighted sum of unit SDF-gradient normals (not renormalised)
    opacity: Tensor  # [N] sum of weights
    depth: Tensor  # [N] expected distance along the ray given a hit: sum(w t) / opacity; 0 if empty
    conflict: Tensor  # [N] sum(w c) (background counts as trusted); 0 on the trusted view
    inv_s: Tensor  # [] current NeuS sharpness
    ray_indices: Tensor | None = None  # [S] long
    t: Tensor | None = None  # [S] sample distance along its ray
    weights: Tensor | None = None  # [S]
    sdf: Tensor | None = None  # [S]
    sdf_grad: Tensor | None = None  # [S, 3] for the eikonal loss

    @property
    def num_samples(self) -> int:
        return 0 if self.ray_indices is None else int(self.ray_indices.shape[0])


class SingleVarianceNetwork(nn.Module):
    """NeuS's learned sharpness: inv_s = exp(10 * variance), one scalar."""

    def __init__(self, init_val: float = 0.3):
        super().__init__()
        self.variance = nn.Parameter(torch.tensor(float(init_val)))

    @property
    def inv_s(self) -> Tensor:
        return torch.exp(self.variance * 10.0).clamp(1e-6, 1e6)


def ray_aabb(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Slab test against [-bound, bound]^3: t_near, t_far [N] (t_near >= 0) and hit [N] bool."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-bound - origins) / safe, (bound - origins) / safe
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far, t_far > t_near


def neus_alpha(sdf: Tensor, normal: Tensor, dirs: Tensor, dt: float, inv_s: Tensor,
               cos_anneal_ratio: float = 1.0) -> Tensor:
    """[S] sdf, [S, 3] unit normals and ray dirs -> [S] alpha of a section of length dt."""
    true_cos = (dirs * normal).sum(-1)
    # Annealing keeps the cos "alive" early in training (NeuS): always non-positive.
    iter_cos = -(nn.functional.relu(-true_cos * 0.5 + 0.5) * (1.0 - cos_anneal_ratio)
                 + nn.functional.relu(-true_cos) * cos_anneal_ratio)
    prev_cdf = torch.sigmoid((sdf - iter_cos * dt * 0.5) * inv_s)
    next_cdf = torch.sigmoid((sdf + iter_cos * dt * 0.5) * inv_s)
    return ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0)


class NeuSRenderer(nn.Module):
    """Owns the field, the variance and the occupancy grid; renders rays to a RenderOutput."""

    def __init__(self, field_: FusionField, cfg: RenderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or RenderConfig()
        self.field = field_
        self.bound = field_.cfg.bound
        self.variance = SingleVarianceNetwork(cfg.variance_init)
        self.occupancy = OccupancyGrid(self.bound, cfg.occupancy) if cfg.occupancy else None
        self.step_size = 2 * math.sqrt(3) * self.bound / cfg.num_steps
        self.cos_anneal_ratio = 1.0 if cfg.cos_anneal_end <= 0 else 0.0
        self.register_buffer("background", torch.tensor(cfg.background, dtype=torch.float32),
                             persistent=False)

    def update_step(self, step: int) -> None:
        """Call once per training step before rendering (levels, cos anneal, occupancy)."""
        self.field.update_step(step)
        end = self.cfg.cos_anneal_end
        self.cos_anneal_ratio = 1.0 if end <= 0 else min(1.0, step / end)
        if self.occupancy is not None:
            self.update_occupancy(step)

    def update_occupancy(self, step: int | None = None) -> bool:
        """Refresh the grid (on schedule when `step` is given, now when None)."""
        sdf_fn, inv_s = self.field.geometry.sdf, float(self.variance.inv_s.detach())
        if step is None:
            self.occupancy.update(sdf_fn, inv_s, self.step_size)
            return True
        return self.occupancy.maybe_update(step, sdf_fn, inv_s, self.step_size)

    @torch.no_grad()
    def sample(self, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fixed-step samples kept by the cube and the grid: ray_indices [S], k [S], t [S]."""
        N, dt = origins.shape[0], self.step_size
        t_near, t_far, hit = ray_aabb(origins, dirs, self.bound)
        # Pad only as far as the longest chord of this batch (rays that miss need nothing).
        chord = float((t_far - t_near)[hit].max()) if hit.any() else 0.0
        K = min(math.ceil(chord / dt), self.cfg.num_steps + 1)
        if self.training and self.cfg.stratified:
            offset = torch.rand(N, 1, device=origins.device)
        else:
            offset = torch.full((N, 1), 0.5, device=origins.device)
        t = t_near[:, None] + (torch.arange(K, device=origins.device) + offset) * dt  # [N, K]
        keep = hit[:, None] & (t < t_far[:, None])
        if self.occupancy is not None:
            keep &= self.occupancy.query(origins[:, None, :] + t[..., None] * dirs[:, None, :])
        if (self.cfg.early_stop_eps > 0 and float(self.variance.inv_s) >= self.cfg.early_stop_min_inv_s
                and keep.any()):
            keep &= self._transmittance_estimate(origins, dirs, t, keep) > self.cfg.early_stop_eps
        ray_indices, k = keep.nonzero(as_tuple=True)
        return ray_indices, k, t[ray_indices, k]

    def _transmittance_estimate(self, origins: Tensor, dirs: Tensor, t: Tensor, keep: Tensor) -> Tensor:
        """[N, K] transmittance in front of each kept sample, from SDF values only."""
        ray, k = keep.nonzero(as_tuple=True)
        sdf = t.new_zeros(t.shape)
        sdf[ray, k] = self.field.geometry.sdf(origins[ray] + dirs[ray] * t[ray, k, None])
        # d sdf / dt between neighbouring kept samples; pairs with a gap count as cos 0.
        pair = keep[:, 1:] & keep[:, :-1]
        slope = torch.where(pair, (sdf[:, 1:] - sdf[:, :-1]) / self.step_size, torch.zeros_like(sdf[:, 1:]))
        zero = torch.zeros_like(sdf[:, :1])
        cos = torch.minimum(torch.cat([zero, slope], 1), torch.cat([slope, zero], 1)).clamp(-1e3, 0.0)
        inv_s, half = self.variance.inv_s.detach(), self.step_size * 0.5
        prev_cdf = torch.sigmoid((sdf - cos * half) * inv_s)
        next_cdf = torch.sigmoid((sdf + cos * half) * inv_s)
        alpha = ((prev_cdf - next_cdf + 1e-5) / (prev_cdf + 1e-5)).clamp(0.0, 1.0) * keep
        trans = torch.cumprod(1.0 - alpha + 1e-7, dim=-1)
        return torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], dim=-1)

    def forward(self, origins: Tensor, dirs: Tensor, view: Tensor,
                background: Tensor | None = None) -> RenderOutput:
        """origins, dirs [N, 3] (world, unit dirs), view [N] long, background [N, 3] or [3]."""
        N = origins.shape[0]
        ray_indices, k, t = self.sample(origins.detach(), dirs.detach())
        K = int(k.max()) + 1 if k.numel() else 1
        # Positions are rebuilt from the (possibly pose-refined) rays so gradients reach them.
        o, d = origins[ray_indices], dirs[ray_indices]
        points = o + d * t[:, None]
        out = self.field(points, d, view[ray_indices])
        inv_s = self.variance.inv_s
        alpha = neus_alpha(out.sdf, out.normal, d, self.step_size, inv_s, self.cos_anneal_ratio)
        # Transmittance in the padded [N, K] layout; pruned slots have alpha 0.
        alpha_full = alpha.new_zeros(N, K).index_put((ray_indices, k), alpha)
        trans = torch.cumprod(1.0 - alpha_full + 1e-7, dim=-1)
        trans = torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], dim=-1)
        weights = alpha * trans[ray_indices, k]

        def composite(values: Tensor, w: Tensor = weights) -> Tensor:
            v = w[:, None] * (values if values.dim() == 2 else values[:, None])
            acc = v.new_zeros(N, v.shape[1]).index_add(0, ray_indices, v)
            return acc if values.dim() == 2 else acc[:, 0]

        opacity = composite(torch.ones_like(t))
        bg = self.background if background is None else background
        rgb = composite(out.rgb) + (1.0 - opacity[:, None]) * bg.to(opacity).expand(N, 3)
        depth = composite(t) / opacity.clamp_min(1e-6)
        conflict_w = weights.detach() if self.field.cfg.conflict_detach else weights
        conflict = composite(out.conflict, conflict_w)
        if self.cfg.trusted_view is not None:
            conflict = torch.where(view == self.cfg.trusted_view, torch.zeros_like(conflict), conflict)
        return RenderOutput(rgb=rgb, normal=composite(out.normal), opacity=opacity, depth=depth,
                            conflict=conflict, inv_s=inv_s, ray_indices=ray_indices, t=t,
                            weights=weights, sdf=out.sdf, sdf_grad=out.grad)

    @torch.no_grad()
    def render_chunked(self, origins: Tensor, dirs: Tensor, view: Tensor,
                       background: Tensor | None = None) -> RenderOutput:
        """Evaluation rendering of many rays in chunks; per-ray outputs only."""
        parts = []
        for s in range(0, origins.shape[0], self.cfg.chunk):
            bg = background if background is None or background.dim() == 1 else background[s:s + self.cfg.chunk]
            parts.append(self(origins[s:s + self.cfg.chunk], dirs[s:s + self.cfg.chunk],
                              view[s:s + self.cfg.chunk], bg))
        per_ray = {f.name: torch.cat([getattr(p, f.name) for p in parts])
                   for f in fields(RenderOutput) if f.name in ("rgb", "normal", "opacity", "depth", "conflict")}
        return RenderOutput(**per_ray, inv_s=self.variance.inv_s)
