"""De-conflict fusion of one object as a LightningModule (DESIGN.md §4).

Wiring only: the fields, the renderer and the pose refiner own their weights
(nova3d/fusion/), the losses are pure functions (nova3d/losses/fusion.py). A training step
draws a ray batch from the views, regenerates the rays from the refined poses (so pose
gradients flow), renders, and logs every loss term with its weight. There is no dataset:
the "loader" only counts steps, the rays come from the views held on the device.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from nova3d.errors import Nova3DError
from nova3d.fusion.config import FusionExperimentConfig
from nova3d.fusion.field import FusionField
from nova3d.fusion.poses import PoseRefiner, pose_error, rays_for_pixels
from nova3d.fusion.render import NeuSRenderer, RenderOutput
from nova3d.fusion.supervision import attach_corruption
from nova3d.fusion.views import FusionViews, RayBatch, RaySampler, pixel_centres
from nova3d.losses import fusion as losses

TRUSTED_VIEW = 0  # the input view: never moved, never conflicting


class FusionDiverged(Nova3DError):
    """The optimisation produced non-finite values; nothing is exported."""


class StepCounter(torch.utils.data.IterableDataset):
    """Yields the step index: fusion draws its rays itself, from views already on the device."""

    def __init__(self, steps: int):
        self.steps = steps

    def __iter__(self):
        return iter(range(self.steps))


@dataclass
class ViewRender:
    """Full-view renders at one resolution: [V, 3, R, R] colour/normal, [V, R, R] opacity/conflict."""

    rgb: Tensor
    normal: Tensor
    opacity: Tensor
    conflict: Tensor


class FusionSystem(L.LightningModule):
    def __init__(self, cfg: FusionExperimentConfig, views: FusionViews, true_c2w: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        if self.supervises_conflict() and views.corruption is None:  # fails here, before any step
            views = attach_corruption(views, cfg.loss.conflict_supervision_masks)
        self.views = views
        field_cfg = dataclasses.replace(cfg.field, num_views=views.num_views, reference_view=TRUSTED_VIEW)
        render_cfg = dataclasses.replace(cfg.render, trusted_view=TRUSTED_VIEW)
        self.renderer = NeuSRenderer(FusionField(field_cfg), render_cfg)
        o = cfg.optim
        self.poses = (PoseRefiner(views.num_views, fixed_view=TRUSTED_VIEW, start_step=o.pose_start_step,
                                  refine_depth=o.pose_refine_depth) if o.pose_refine else None)
        self.register_buffer("c2w", views.cameras.c2w.float().clone())
        self.register_buffer("K", views.cameras.K.float().clone())
        self.register_buffer("true_c2w", None if true_c2w is None else true_c2w.float().clone())
        self.sampler: RaySampler | None = None
        self.generator: torch.Generator | None = None

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self) -> None:
        self.views = self.views.to(self.device)
        self.sampler = RaySampler(self.views, self.cfg.optim.object_fraction)
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(StepCounter(self.cfg.optim.steps), batch_size=None)

    def configure_optimizers(self):
        o, field_ = self.cfg.optim, self.renderer.field
        groups = [
            ("grid", list(field_.geometry.encoding.parameters()), o.lr_grid),
            ("net", list(field_.geometry.net.parameters()), o.lr_net),
            ("color", field_.color_parameters(), o.lr_color),
            ("conflict", field_.conflict_parameters(), o.lr_conflict),
            ("variance", list(self.renderer.variance.parameters()), o.lr_variance),
        ]
        if self.poses is not None:
            groups.append(("pose", list(self.poses.parameters()), o.lr_pose))
        grouped = {id(p) for _, ps, _ in groups for p in ps}
        missing = [n for n, p in self.named_parameters() if id(p) not in grouped]
        assert not missing, f"parameters without an optimiser group: {missing}"
        # eps 1e-15 for the hash tables as instant-NGP: most entries see tiny, rare gradients.
        optimizer = torch.optim.Adam([{"params": ps, "lr": lr, "name": n, "eps": 1e-15 if n == "grid" else 1e-8}
                                      for n, ps, lr in groups], betas=(0.9, 0.99))

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / max(o.warmup_steps, 1))
            return warm * o.final_lr_factor ** (min(step, o.steps) / max(o.steps, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ training
    def refined_c2w(self, step: int | None = None) -> Tensor:
        """[V, 4, 4] the cameras with the current corrections (step None: always applied)."""
        return self.c2w if self.poses is None else self.poses(self.c2w, step)

    def uses_conflict(self) -> bool:
        """Whether this run learns conflict maps at all (False for `fusion/no_conflict`)."""
        return self.cfg.loss.conflict_maps and self.cfg.loss.conflict > 0

    def supervises_conflict(self) -> bool:
        """Whether the true corruption supervises the conflict map (`fusion/supervised_conflict`)."""
        return self.uses_conflict() and self.cfg.loss.conflict_supervision > 0

    def conflict_active(self, step: int) -> bool:
        return self.uses_conflict() and step >= self.cfg.loss.conflict_start_step

    def loss_terms(self, out: RenderOutput, rays: RayBatch, step: int) -> dict[str, Tensor]:
        """Every loss term, unweighted; `loss_weights` says how they add up."""
        c = self.cfg.loss
        err = losses.color_error(out.rgb, rays.rgb, c.color_metric)
        use_conflict = self.conflict_active(step)
        terms = {
            "color": losses.conflict_weighted_color(err, out.conflict if use_conflict else None),
            "normal": losses.normal_loss(out.normal, rays.normal, rays.mask),
            "mask": losses.mask_loss(out.opacity, rays.mask),
            "eikonal": losses.eikonal_loss(out.sdf_grad),
        }
        if c.sparsity > 0:
            b = self.renderer.bound
            pts = (torch.rand(c.sparsity_points, 3, generator=self.generator, device=self.device) * 2 - 1) * b
            terms["sparsity"] = losses.sparsity_loss(self.renderer.field.geometry.sdf(pts), c.sparsity_scale)
        if use_conflict:
            on_object = err[rays.mask > 0.5]
            typical = on_object.median().detach() if on_object.numel() else err.new_tensor(0.0)
            self.conflict_lambda = torch.clamp_min(c.conflict * typical, c.conflict_min_error)
            terms["conflict"] = self.conflict_lambda * losses.conflict_regulariser(out.conflict, rays.view == TRUSTED_VIEW)
        if self.supervises_conflict():  # from step 0: the oracle does not wait for the geometry
            keep = (rays.mask > 0.5) & (rays.view != TRUSTED_VIEW)
            terms["conflict_supervision"] = losses.conflict_supervision(out.conflict, rays.corruption, keep)
        if self.poses is not None and self.poses.enabled(step):
            terms["pose"] = losses.pose_regulariser(self.poses.delta)
        return terms

    def loss_weights(self) -> dict[str, float]:
        c = self.cfg.loss
        return {"color": c.color, "normal": c.normal, "mask": c.mask, "eikonal": c.eikonal, "sparsity": c.sparsity,
                # the conflict term carries its lambda (an error level): it scales with the colour weight
                "conflict": c.color, "conflict_supervision": c.conflict_supervision, "pose": c.pose}

    def training_step(self, batch: int, batch_idx: int) -> Tensor:
        step = self.global_step
        self.renderer.update_step(step)
        rays = self.sampler.sample(self.cfg.optim.rays, self.generator)
        c2w = self.refined_c2w(step)
        origins, dirs = rays_for_pixels(c2w[rays.view], self.K[rays.view], rays.pix)
        out = self.renderer(origins, dirs, rays.view)
        terms = self.loss_terms(out, rays, step)
        weights = self.loss_weights()
        total = sum(weights[k] * v for k, v in terms.items())
        if not torch.isfinite(total):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise FusionDiverged(f"{self.views.folder}: non-finite loss at step {step} ({', '.join(bad)}); "
                                 "no mesh written (try lower optim.lr_grid or a different seed)")
        logs = {f"loss/{k}": v.detach() for k, v in terms.items()}
        if "conflict" in terms:
            logs["train/conflict_lambda"] = self.conflict_lambda
        logs.update({"loss/total": total.detach(), "train/inv_s": out.inv_s.detach(),
                     "train/samples_per_ray": torch.tensor(out.num_samples / max(len(rays.view), 1))})
        if self.poses is not None and self.true_c2w is not None:
            rot, trans = pose_error(self.refined_c2w().detach(), self.true_c2w)
            logs.update({"pose/rotation_error_deg": rot[1:].mean(), "pose/translation_error": trans[1:].mean()})
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(rays.view))
        self.log("loss", total.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 batch_size=len(rays.view))
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.cfg.logging.preview_every_n_steps
        step = self.global_step  # already incremented
        if every > 0 and self.logger is not None and (step % every == 0 or step == self.cfg.optim.steps):
            self.log_previews(step)

    # ------------------------------------------------------------------ rendering
    @torch.no_grad()
    def render_views(self, resolution: int, views: list[int] | None = None) -> ViewRender:
        """Render views at `resolution`² with the refined poses (white background)."""
        was_training = self.training
        self.eval()
        V, full = self.views.num_views, self.views.resolution
        views = list(range(V)) if views is None else views
        c2w = self.refined_c2w()
        K = self.K.clone()
        K[:, :2] *= resolution / full
        pix = pixel_centres(resolution, resolution, self.device)
        parts = []
        for v in views:
            idx = torch.full((pix.shape[0],), v, dtype=torch.long, device=self.device)
            o, d = rays_for_pixels(c2w[idx], K[idx], pix)
            parts.append(self.renderer.render_chunked(o, d, idx))
        self.train(was_training)
        R = resolution

        def grid(name: str, channels: int) -> Tensor:
            x = torch.stack([getattr(p, name) for p in parts]).reshape(len(views), R, R, channels)
            return x.permute(0, 3, 1, 2) if channels > 1 else x[..., 0]

        return ViewRender(grid("rgb", 3).clamp(0, 1), grid("normal", 3), grid("opacity", 1), grid("conflict", 1))

    def log_previews(self, step: int) -> None:
        """TensorBoard: target | render | normals | conflict for a few views; pose corrections."""
        from nova3d.fusion.preview import colormap

        V, R = self.views.num_views, self.cfg.logging.preview_resolution
        views = sorted({0, V // 4, V // 2, 3 * V // 4})
        out = self.render_views(R, views)
        target = torch.nn.functional.interpolate(self.views.rgb[views], size=(R, R), mode="area")
        heat = colormap(out.conflict.clamp(0, 1).cpu()).permute(0, 3, 1, 2).to(target)
        rows = torch.cat([target, out.rgb, (out.normal * 0.5 + 0.5).clamp(0, 1), heat], dim=3)  # [v, 3, R, 4R]
        image = torch.cat(list(rows), dim=1)  # [3, v*R, 4R]
        self.logger.experiment.add_image("views/target|render|normal|conflict", image.cpu(), step)
        if self.poses is not None:
            delta = (self.poses.delta * self.poses.mask).detach()
            self.logger.experiment.add_histogram("pose/rotation_deg", torch.rad2deg(delta[:, :3].norm(dim=-1)), step)
            self.logger.experiment.add_histogram("pose/translation", delta[:, 3:].norm(dim=-1), step)

    # ------------------------------------------------------------------ outputs
    def color_fn(self, points: Tensor, normals: Tensor) -> Tensor:
        """Texture colour at surface points [P, 3] with outward normals [P, 3] -> [P, 3].

        The input view's colours (its embedding or colour transform where the field has
        per-view ones: its colours are the trusted ones), seen along the ray of the camera that
        faces the point most directly: a direction the colour net was trained on, unlike e.g.
        -normal, where its view-dependent (SH) part extrapolates into coloured blotches."""
        field_ = self.renderer.field
        geo = field_.geometry(points, with_grad=False)
        centres = self.refined_c2w()[:, :3, 3].to(points)  # [V, 3]
        to_cam = torch.nn.functional.normalize(centres[None] - points[:, None], dim=-1)  # [P, V, 3]
        best = (to_cam * normals[:, None]).sum(-1).argmax(1)
        dirs = -to_cam[torch.arange(len(points), device=points.device), best]
        return field_.color(points, normals, dirs, geo.feature, None)

    def sdf_fn(self, points: Tensor) -> Tensor:
        return self.renderer.field.geometry.sdf(points)

    def pose_errors(self) -> dict[str, float] | None:
        """Mean rotation (deg) / translation error of views 1.. before and after refinement."""
        if self.true_c2w is None:
            return None
        rot0, tr0 = pose_error(self.c2w, self.true_c2w)
        rot1, tr1 = pose_error(self.refined_c2w().detach(), self.true_c2w)
        out = {"rotation_error_deg_before": rot0[1:].mean(), "rotation_error_deg_after": rot1[1:].mean(),
               "translation_error_before": tr0[1:].mean(), "translation_error_after": tr1[1:].mean()}
        return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}
