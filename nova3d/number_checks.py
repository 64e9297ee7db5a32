"""Number checks for config schemas: each raises a one-line Nova3DError naming the option.

Called from the schemas themselves (a dataclass's `__post_init__` or `check()`), so a bad number
fails when the config is built, before any weights load or any fit starts, and wherever the
schema is used (CLI, Python API, experiment YAML).
"""
from __future__ import annotations

import math
from typing import Optional

from nova3d.errors import Nova3DError

TORCH_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1 (more overflows)
GUIDANCE_MAX = 100.0  # classifier-free guidance scale: SVD uses 1..3, 20+ already saturates the views
LIGHTNING_SEED_MAX = 2**32 - 1  # lightning.seed_everything (numpy's range); outside it picks another seed


def finite(name: str, value: float) -> float:
    try:
        ok = math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise Nova3DError(f"{name} must be a finite number, got {value!r}")
    return value


def in_range(name: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
             low_open: bool = False) -> float:
    """`value` finite and low <= value <= high (low < value with low_open); None = no bound."""
    finite(name, value)
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise Nova3DError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")
    return value


def positive(name: str, value: float) -> float:
    return in_range(name, value, 0, low_open=True)


def count(name: str, value: int, minimum: int = 1) -> int:
    """A whole number >= minimum (steps, rays, frames, ...)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Nova3DError(f"{name} must be a whole number, got {value!r}")
    return int(in_range(name, value, minimum))


def seed(name: str, value: int, maximum: int = TORCH_SEED_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise Nova3DError(f"{name} must be a whole number from 0 to {maximum}, got {value!r}")
    return value
