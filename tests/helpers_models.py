"""Shared by the model tests: building a module under a fixed seed without touching the global RNG."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def seeded(fn: Callable[[], T], seed: int = 0) -> T:
    """fn() under torch.manual_seed(seed), the caller's RNG state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()
