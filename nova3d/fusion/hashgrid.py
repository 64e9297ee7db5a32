"""Multi-resolution hash-grid encoding (Instant-NGP) in plain PyTorch.

All levels are interpolated at once: the grid vertices of every level live in one parameter
table [sum_l T_l, F], level l starting at row `offsets[l]`. Coarse levels whose
(res + 1)^3 vertices fit into 2^log2_table_size rows are indexed densely (one row per
vertex, no collisions, and only that many rows are allocated); finer levels use the
Instant-NGP spatial hash (x * 1 xor y * 2654435761 xor z * 805459861) mod T. In int64 the
products do not overflow, and because T divides 2^32 the result is exactly the uint32
hash of tiny-cuda-nn.

Level l has resolution floor(base * b^l) cells per axis, b = (max/base)^(1/(L-1));
a point x in [0, 1]^3 sits at x * res in vertex units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridConfig:
    levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 2048
    init_scale: float = 1e-4  # table ~ U(-s, s), as tiny-cuda-nn

    @property
    def output_dim(self) -> int:
        return self.levels * self.features_per_level


def level_resolutions(cfg: HashGridConfig) -> list[int]:
    """Cells per axis of each level, coarse to fine."""
    if cfg.levels == 1:
        return [cfg.base_resolution]
    growth = math.exp((math.log(cfg.max_resolution) - math.log(cfg.base_resolution)) / (cfg.levels - 1))
    return [int(math.floor(cfg.base_resolution * growth**level + 1e-6)) for level in range(cfg.levels)]


class HashGrid(nn.Module):
    """x [P, 3] in [0, 1]^3 -> features [P, levels * features_per_level] (level-major)."""

    def __init__(self, cfg: HashGridConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or HashGridConfig()
        table_size = 2 ** cfg.log2_table_size
        res = level_resolutions(cfg)
        sizes = [min((r + 1) ** 3, table_size) for r in res]
        # Resolutions grow, so the dense levels are a prefix of the list.
        self.num_dense = sum((r + 1) ** 3 <= table_size for r in res)
        self.table_size = table_size
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.register_buffer("resolution", torch.tensor(res, dtype=torch.float32), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets[:-1], dtype=torch.long), persistent=False)
        self.register_buffer("strides", torch.tensor([[1, r + 1, (r + 1) ** 2] for r in res],
                                                     dtype=torch.long), persistent=False)
        self.table = nn.Parameter(torch.empty(offsets[-1], cfg.features_per_level))
        nn.init.uniform_(self.table, -cfg.init_scale, cfg.init_scale)

    @property
    def output_dim(self) -> int:
        return self.cfg.output_dim

    def forward(self, x: Tensor) -> Tensor:
        """x: [P, 3] in [0, 1] -> [P, L * F]."""
        P, L, F = x.shape[0], self.cfg.levels, self.cfg.features_per_level
        res = self.resolution[None, :, None]
        pos = x.clamp(0.0, 1.0)[:, None, :] * res  # [P, L, 3]
        # Clamp so that x == 1 interpolates inside the last cell (its far corner is vertex res).
        base = torch.minimum(pos.floor(), res - 1)
        frac = pos - base
        # Low/high vertex per axis [P, L, 3, 2]; the 8 corners are their outer combinations
        # (x-major), built by broadcasting rather than materialising [P, L, 8, 3] coordinates.
        vert = base.long()[..., None] + torch.arange(2, device=x.device)
        rows = torch.cat([self._dense_rows(vert[:, :self.num_dense]),
                          self._hashed_rows(vert[:, self.num_dense:])], dim=1)
        rows = rows + self.offsets[None, :, None, None, None]
        f = self.table.index_select(0, rows.reshape(-1)).view(P, L, 2, 2, 2, F)
        # Trilinear as three separable lerps (z, y, x): ~1.6x faster than 8 corner weights
        # forward + double backward on CPU (measured), and the same values.
        f = torch.lerp(f[..., 0, :], f[..., 1, :], frac[:, :, 2, None, None, None])
        f = torch.lerp(f[..., 0, :], f[..., 1, :], frac[:, :, 1, None, None])
        f = torch.lerp(f[..., 0, :], f[..., 1, :], frac[:, :, 0, None])
        return f.reshape(P, L * F)

    def _dense_rows(self, vert: Tensor) -> Tensor:
        """Vertices [P, Ld, 3, 2] of dense levels -> rows within each level [P, Ld, 2, 2, 2]."""
        v = vert * self.strides[: vert.shape[1], :, None]
        return v[..., 0, :, None, None] + v[..., 1, None, :, None] + v[..., 2, None, None, :]

    def _hashed_rows(self, vert: Tensor) -> Tensor:
        """Vertices [P, Lh, 3, 2] of hashed levels -> rows within each level [P, Lh, 2, 2, 2]."""
        hx, hy, hz = (vert[..., i, :] * PRIMES[i] for i in range(3))
        h = torch.bitwise_xor(torch.bitwise_xor(hx[..., :, None, None], hy[..., None, :, None]),
                              hz[..., None, None, :])
        return torch.bitwise_and(h, self.table_size - 1)  # the table size is a power of two
