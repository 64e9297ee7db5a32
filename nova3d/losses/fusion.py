"""Losses of de-conflict fusion (DESIGN.md §4). Pure functions: tensors in, tensors out.

Conflict-weighted colour (ours, following the paper's description): each ray's colour error e
is multiplied by (1 - c), c in (0, 1) the conflict the network predicts for that ray, and the
regulariser adds lambda * c. Per ray the conflict net therefore minimises
(1 - c) e + lambda c, whose gradient lambda - e pushes c up only where the error exceeds
lambda: lambda is the error a view may show before it is considered to disagree, and
"everything conflicts" costs lambda per ray instead of nothing. The input view has c = 0
(the renderer enforces it), so at least one view always drives the texture.
"""
from __future__ import annotations

import torch
from torch import Tensor


def color_error(pred: Tensor, target: Tensor) -> Tensor:
    """[N, 3] x2 -> [N] mean absolute error per ray (L1 is robust to the outliers generation makes)."""
    return (pred - target).abs().mean(-1)


def conflict_weighted_color(error: Tensor, conflict: Tensor | None) -> Tensor:
    """[N] errors, [N] conflicts (None: all trusted) -> [] mean of (1 - c) * e."""
    return error.mean() if conflict is None else ((1.0 - conflict) * error).mean()


def conflict_regulariser(conflict: Tensor, trusted: Tensor) -> Tensor:
    """[N] conflicts, [N] bool rays of the trusted (input) view -> [] mean conflict of the others."""
    untrusted = ~trusted
    return conflict[untrusted].mean() if untrusted.any() else conflict.sum() * 0.0


def normal_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """[N, 3] rendered / target world normals, [N] mask -> [] mean (1 - cos) over object rays."""
    if not mask.any():
        return pred.sum() * 0.0
    cos = torch.nn.functional.cosine_similarity(pred[mask > 0.5], target[mask > 0.5], dim=-1)
    return (1.0 - cos).mean()


def mask_loss(opacity: Tensor, mask: Tensor) -> Tensor:
    """[N] rendered opacity, [N] target in {0, 1} -> [] binary cross-entropy (L_mask)."""
    # Written out rather than F.binary_cross_entropy, which raises on NaN input: a diverged
    # run must reach the caller's finiteness check and its clear message.
    p = opacity.clamp(1e-4, 1 - 1e-4)
    return -(mask * torch.log(p) + (1 - mask) * torch.log1p(-p)).mean()


def eikonal_loss(grad: Tensor) -> Tensor:
    """[P, 3] SDF gradients -> [] mean (|grad| - 1)^2."""
    return ((grad.norm(dim=-1) - 1.0) ** 2).mean() if grad.numel() else grad.sum() * 0.0


def sparsity_loss(sdf: Tensor, scale: float = 100.0) -> Tensor:
    """[P] SDF at random points of the cube -> [] mean exp(-scale |sdf|) (R_sparse, SparseNeuS):
    penalises surfaces where the views show none (floaters, unseen pockets)."""
    return torch.exp(-scale * sdf.abs()).mean()


def pose_regulariser(delta: Tensor) -> Tensor:
    """[V, 6] pose corrections (rotation vector, translation) -> [] mean squared norm."""
    return (delta**2).sum(-1).mean()
