"""Timing shared by the benchmark scripts (each runs as `python bench/NAME.py`, so bench/ is on sys.path)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median seconds over `repeats` calls, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
