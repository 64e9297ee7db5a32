"""The true corruption of a `nova3d perturb` folder as a target for the conflict map (issue 15 §2:
an oracle upper bound for the learned maps; loss.conflict_supervision, fusion/supervised_conflict).
"""
from __future__ import annotations

import dataclasses

import torch

from nova3d.errors import Nova3DError
from nova3d.fusion.perturb import load_corruption_masks
from nova3d.fusion.views import FusionViews


def attach_corruption(views: FusionViews, masks: str) -> FusionViews:
    """`views` with `corruption` [V, R, R] read from `views.folder / masks` (one PNG per view at the
    folder's resolution), area-pooled to the views' resolution. One-line Nova3DError when the
    folder has no such masks or they do not match the views."""
    try:
        truth = load_corruption_masks(views.folder, masks)
    except Nova3DError:
        raise Nova3DError(f"{views.folder}: loss.conflict_supervision needs the true corruption masks in "
                          f"{views.folder / masks} (written by `nova3d perturb`); this folder has none") from None
    if len(truth) != views.num_views or truth.shape[1] != truth.shape[2] or truth.shape[1] < views.resolution:
        raise Nova3DError(f"{views.folder / masks}: {len(truth)} masks of {truth.shape[2]}x{truth.shape[1]} do not "
                          f"match {views.num_views} views of {views.resolution}²")
    target = torch.from_numpy(truth).float()[:, None]
    if target.shape[-1] != views.resolution:  # the fit runs below the folder's resolution
        target = torch.nn.functional.interpolate(target, size=(views.resolution,) * 2, mode="area")
    return dataclasses.replace(views, corruption=target[:, 0].to(views.rgb.device))
