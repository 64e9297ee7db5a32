"""The memory ladder's independent check: a real float32 CPU step's peak-RSS growth against the prediction.

    python bench/memory_validation.py ARCH MODEL CKPT LATENT FRAMES     # the worker (one JSON line)

`validation_row` runs the worker in a fresh subprocess with glibc's mmap threshold fixed (so freed
memory leaves the RSS) and compares its measurement with the fake-tensor prediction of the same step.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from bench.step_memory import GIB, LATENT_SCALE, step_memory  # noqa: E402

MMAP_THRESHOLD = 128 * 1024  # bytes; see validation_row


def measure_worker(arch: str, model: str, checkpointing: str, latent: int, frames: int) -> dict[str, Any]:
    """In a fresh process: the real float32 CPU step, tracked, and its peak-RSS growth."""
    torch.set_num_threads(1)
    gc.collect()
    # The high-water mark reset to the current RSS first: otherwise a transient peak of the imports
    # hides part of the step's (measured 0.72x the prediction on a CI machine, 2026-12-07).
    before = _reset_peak_rss()
    real = step_memory(arch, model, checkpointing, latent, frames, fake=False, precision="32")
    after = _proc_status_bytes("VmHWM")
    return {"tracked_real_bytes": real["peak_bytes"], "rss_growth_bytes": after - before}


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux: `5` into /proc/self/clear_refs) and return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def validation_row(arch: str, model: str, checkpointing: str, latent: int, frames: int) -> dict[str, Any]:
    predicted = step_memory(arch, model, checkpointing, latent, frames, precision="32")["peak_bytes"]
    cmd = [sys.executable, __file__, arch, model, checkpointing, str(latent), str(frames)]
    # A fixed mmap threshold: glibc then returns every freed tensor to the OS at once, so the peak RSS
    # counts live memory; with its default (dynamic) threshold, freed activations stay in the heap and
    # the RSS of a checkpointed step measured 2.8x its live peak (docs/benchmarks.md).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    return {"resolution": latent * LATENT_SCALE[arch], "views": frames, "checkpointing": checkpointing == "full",
            "checkpointing_kind": checkpointing, "model": model, "arch": arch, "precision": "32", "device": "cpu",
            "predicted_peak_gib": round(predicted / GIB, 4),
            "measured_peak_gib": round(measured["rss_growth_bytes"] / GIB, 4),
            "tracked_real_peak_gib": round(measured["tracked_real_bytes"] / GIB, 4),
            "measured_over_predicted": round(measured["rss_growth_bytes"] / predicted, 3)}


if __name__ == "__main__":
    arch, model, ckpt, latent, frames = sys.argv[1:6]
    print(json.dumps(measure_worker(arch, model, ckpt, int(latent), int(frames))))
