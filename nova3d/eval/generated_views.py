"""Generated views against the true renders of the same object, view by view.

What the toy recipe is judged on (bench/toy_generation.py, the demo, tests/test_toy_model.py):
  - RGB: PSNR and SSIM of the generated views on white against the renders on white;
  - normals: mean angle (degrees) between generated and true normals on the TRUE foreground,
    both in the input view's camera frame;
  - RGB-normal alignment: IoU of the RGB foreground (colour distance from white) against the
    normal-map foreground (nova3d.pipeline's two coverage estimates), per generated view: misaligned
    or swapped domains show here first.
Means are over the novel views (1..V-1): view 0 is the input, which a baseline copies exactly.

Trivial baselines, scored the same way: `input_repeated` (the input view for every view, and the
TRUE input-view normals for every view: information the model is not given), and `train_mean`
(the per-pixel mean of training renders, `mean_views`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from nova3d.data.shards import ObjectSample

FOREGROUND = 0.5  # coverage at or above this is object


@dataclass
class Views:
    """One object's orbit: rgb [V, 3, H, W] in [0, 1] on white, unit normals [V, 3, H, W] in the
    input view's frame (any value off the object), coverage masks [V, 1, H, W] in [0, 1]."""

    rgb: Tensor
    normals: Tensor
    masks: Tensor

    @classmethod
    def from_sample(cls, sample: ObjectSample) -> "Views":
        """A stored object folder's views (renders store normals in the input view's frame)."""
        if sample.cameras.normal_frame != "input_view":
            raise ValueError(f"{sample.object_id}: normals stored in {sample.cameras.normal_frame!r}, "
                             "expected 'input_view'")
        rgba = torch.from_numpy(sample.rgba).float() / 255
        rgb = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])
        normals = torch.from_numpy(sample.normal.astype(np.float32)) / 65535 * 2 - 1
        masks = torch.from_numpy(sample.mask).float().unsqueeze(1) / 255
        return cls(rgb, F.normalize(normals, dim=1), masks)


@dataclass
class ViewScores:
    """Per-view scores (lists over all V views) and their means over the novel views."""

    psnr: list[float]
    ssim: list[float]
    normal_error_deg: list[float]
    mask_iou: list[float] = field(default_factory=list)  # RGB vs normal foreground of the prediction

    def mean(self, name: str) -> float | None:
        values = getattr(self, name)[1:]
        return float(np.mean(values)) if values else None

    def means(self) -> dict[str, float | None]:
        return {name: self.mean(name) for name in ("psnr", "ssim", "normal_error_deg", "mask_iou")}


def psnr_per_view(pred: Tensor, true: Tensor) -> list[float]:
    mse = ((pred.float() - true.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).tolist()


def ssim_per_view(pred: Tensor, true: Tensor) -> list[float]:
    return [float(structural_similarity_index_measure(p[None].float(), t[None].float(), data_range=1.0))
            for p, t in zip(pred, true)]


def normal_error_per_view(pred: Tensor, true: Tensor, true_masks: Tensor) -> list[float]:
    """Mean angle in degrees on each view's true foreground (nan where a view shows no object)."""
    cos = (F.normalize(pred.float(), dim=1) * F.normalize(true.float(), dim=1)).sum(dim=1).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos))
    fg = true_masks[:, 0] >= FOREGROUND
    return [float(a[m].mean()) if m.any() else float("nan") for a, m in zip(angle, fg)]


def rgb_normal_mask_iou(rgb: Tensor, normal_masks: Tensor) -> list[float]:
    """IoU of the RGB foreground (pipeline.rgb_coverage) against the normal foreground, per view."""
    from nova3d.pipeline import rgb_coverage

    a = rgb_coverage(rgb)[:, 0] >= FOREGROUND
    b = normal_masks[:, 0] >= FOREGROUND
    inter, union = (a & b).sum(dim=(1, 2)).float(), (a | b).sum(dim=(1, 2)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).tolist()


def score_views(pred: Views, true: Views) -> ViewScores:
    """`pred` against `true` (same V and size; masks of `pred` are its normal-map coverage)."""
    if pred.rgb.shape != true.rgb.shape:
        raise ValueError(f"generated views {tuple(pred.rgb.shape)} and true views {tuple(true.rgb.shape)} differ")
    return ViewScores(psnr_per_view(pred.rgb, true.rgb), ssim_per_view(pred.rgb, true.rgb),
                      normal_error_per_view(pred.normals, true.normals, true.masks),
                      rgb_normal_mask_iou(pred.rgb, pred.masks))


def input_repeated(true: Views) -> Views:
    """The input view (and its true normals and mask) for every view."""
    v = true.rgb.shape[0]
    return Views(true.rgb[:1].expand(v, -1, -1, -1), true.normals[:1].expand(v, -1, -1, -1),
                 true.masks[:1].expand(v, -1, -1, -1))


def mean_views(samples: list[Views]) -> Views:
    """The per-pixel mean of training objects' views (one image, repeated for every view): RGB and
    masks averaged, normals the normalised mean (facing the camera where nothing is)."""
    rgb = torch.stack([s.rgb for s in samples]).mean(dim=(0, 1))
    masks = torch.stack([s.masks for s in samples]).mean(dim=(0, 1))
    summed = torch.stack([s.normals * (s.masks >= FOREGROUND) for s in samples]).sum(dim=(0, 1))
    facing = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand_as(summed)
    normals = torch.where(summed.norm(dim=0, keepdim=True) > 1e-6, F.normalize(summed, dim=0), facing)
    v = samples[0].rgb.shape[0]
    return Views(rgb[None].expand(v, -1, -1, -1), normals[None].expand(v, -1, -1, -1),
                 masks[None].expand(v, -1, -1, -1))
