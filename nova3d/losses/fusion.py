"""Losses of de-conflict fusion (DESIGN.md §4). Pure functions: tensors in, tensors out.

Conflict-weighted colour (ours, following the paper's description): each ray's colour error e
is multiplied by (1 - c), c in (0, 1) the conflict the network predicts for that ray, and the
regulariser adds (lambda / 2) c^2. Per ray the conflict net therefore minimises
(1 - c) e + (lambda / 2) c^2, whose minimum is c = min(1, e / lambda): the conflict is the error
the network expects for that view and point, in units of lambda, the error at which a ray is
ignored entirely. "Everything conflicts" costs lambda / 2 per ray instead of nothing.
Why quadratic: with a linear regulariser lambda c the optimum is 0 or 1 and every clean ray
pushes its logit to -inf; the shared conflict MLP then saturates at ~0 everywhere before the
rare corrupted rays can pull it up (measured: maps collapsed to < 3e-3 on corrupted views).
With c^2 the clean rays have an interior optimum (c ~ e_typical / lambda) and the sigmoid stays
in its responsive range. The input view has c = 0 (the renderer enforces it), so at least one
view always drives the texture.
"""
from __future__ import annotations

import torch
from torch import Tensor


COLOR_METRICS = ("l1", "mse")


def color_error(pred: Tensor, target: Tensor, metric: str = "l1") -> Tensor:
    """[N, 3] x2 -> [N] per-ray error: mean absolute ("l1", NeuS) or squared ("mse", Wonder3D's
    instant-nsr-pl recipe) over the channels."""
    diff = pred - target
    if metric == "l1":
        return diff.abs().mean(-1)
    if metric == "mse":
        return diff.square().mean(-1)
    raise ValueError(f"colour metric must be one of {list(COLOR_METRICS)}, got {metric!r}")


def conflict_weighted_color(error: Tensor, conflict: Tensor | None) -> Tensor:
    """[N] errors, [N] conflicts (None: all trusted) -> [] mean of (1 - c) * e."""
    return error.mean() if conflict is None else ((1.0 - conflict) * error).mean()


def conflict_regulariser(conflict: Tensor, trusted: Tensor) -> Tensor:
    """[N] conflicts, [N] bool rays of the trusted (input) view -> [] sum of c^2 / 2 over the
    other rays / N (so that with `conflict_weighted_color` each ray's optimum is c = e / lambda
    once multiplied by lambda)."""
    return 0.5 * (conflict.square() * (~trusted)).sum() / max(conflict.numel(), 1)


def conflict_supervision(conflict: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    """[N] rendered conflicts, [N] true corruption in [0, 1], [N] bool rays to score (object rays of
    the non-input views) -> [] mean binary cross-entropy over them (0 with a graph when none).
    Written out, clamped, like mask_loss: a NaN must reach the caller's finiteness check."""
    if not keep.any():
        return conflict.sum() * 0.0
    c, y = conflict[keep].clamp(1e-4, 1 - 1e-4), target[keep]
    return -(y * torch.log(c) + (1 - y) * torch.log1p(-c)).mean()


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
