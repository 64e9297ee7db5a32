"""Multi-domain EDM loss: one loss per domain video (RGB, normals), weighted into a total.

Pure functions on tensors. Rows are domain-major ([D*B, ...], nova3d.models.gta): rows
d*B .. d*B + B - 1 hold domain d of the B objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from nova3d.models.edm import edm_loss
from nova3d.models.gta import split_domains


@dataclass(frozen=True)
class DomainLosses:
    total: Tensor  # [] Σ_d weights[d] · per_domain[d]
    per_domain: Tensor  # [D] mean EDM loss over each domain's latents
    weights: Tensor  # [D]


def weighted_total(per_domain: Tensor, weights: Sequence[float] | Tensor) -> DomainLosses:
    """per_domain [D] -> DomainLosses with total = Σ weights·per_domain."""
    w = torch.as_tensor(weights, dtype=per_domain.dtype, device=per_domain.device)
    if w.shape != per_domain.shape:
        raise ValueError(f"{w.numel()} weights for {per_domain.numel()} domains")
    return DomainLosses(total=(w * per_domain).sum(), per_domain=per_domain, weights=w)


def multi_domain_edm_loss(denoised: Tensor, target: Tensor, sigma: Tensor,
                          weights: Sequence[float] | Tensor) -> DomainLosses:
    """denoised, target: [D*B, F, C, h, w]; sigma: [D*B]; weights: D floats.

    Per domain: the mean over its B objects of λ(σ)·mean((D − x0)²) (edm.edm_loss), float32.
    """
    num_domains = len(weights)
    rows = edm_loss(denoised, target, sigma, reduction="none")  # [D*B]
    return weighted_total(split_domains(rows, num_domains).mean(dim=1), weights)
