"""Exponential moving average of a model's trainable parameters.

Kept outside the module tree on purpose: as buffers, DDP would broadcast the whole copy on
every forward pass. The owner saves `state_dict()` into its checkpoint (plain tensors, so it
loads with `torch.load(weights_only=True)`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn


class ParameterEMA:
    """shadow ← d·shadow + (1 − d)·param, with d = min(decay, (1 + n)/(10 + n)) after n updates.

    The warm-up of d (diffusers' EMAModel default) keeps early averages from being dominated
    by the initial weights. Shadows are float32 on the parameters' device.
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> None:
        """One EMA step (call after each optimizer step). The first call copies the parameters."""
        d = self.current_decay()
        for name, p in named_params:
            s = self.shadow.get(name)
            if s is None:
                self.shadow[name] = p.detach().float().clone()
                continue
            if s.device != p.device:
                s = self.shadow[name] = s.to(p.device)
            s.lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    @contextmanager
    def applied(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> Iterator[None]:
        """Parameters hold their EMA values inside the block and their own values again after it."""
        params = [(n, p) for n, p in named_params if n in self.shadow]
        backup = [p.detach().clone() for _, p in params]
        with torch.no_grad():
            for name, p in params:
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(params, backup):
                    p.copy_(saved)

    @torch.no_grad()
    def copy_to(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> int:
        """Overwrite parameters with their EMA values (for export); returns how many were copied."""
        count = 0
        for name, p in named_params:
            if name in self.shadow:
                p.copy_(self.shadow[name])
                count += 1
        return count

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = dict(state["shadow"])
