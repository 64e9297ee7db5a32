"""How well a conflict map finds the corrupted pixels: AUROC against known corruption masks
(nova3d.fusion.perturb writes them), used by `make demo` and bench/fusion_quality.py."""
from __future__ import annotations

import numpy as np
import torch


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` separating labels True from False (ties count half:
    the Mann-Whitney U statistic with average ranks). NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores but {y.size} labels")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based average rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def conflict_auroc(conflict: torch.Tensor, corrupted: np.ndarray, object_mask: np.ndarray,
                   input_view: int = 0) -> float:
    """AUROC of the conflict maps [V, R, R] against the true corruption masks [V, H, W] (bool),
    over object pixels (object_mask [V, H, W] > 0) of the non-input views; the maps are
    nearest-upsampled to H x W."""
    V, H, W = corrupted.shape
    up = torch.nn.functional.interpolate(conflict.float()[:, None], size=(H, W), mode="nearest")[:, 0].numpy()
    keep = (object_mask > 0) & (np.arange(V) != input_view)[:, None, None]
    return auroc(up[keep], corrupted[keep])
