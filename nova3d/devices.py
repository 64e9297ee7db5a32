"""The one place a `--device` / `device:` value (auto, cpu, cuda, cuda:N) becomes a torch device."""
from __future__ import annotations

import torch

from nova3d.errors import Nova3DError

DEVICE_TYPES = ("cpu", "cuda")  # what nova3d runs on; torch also parses meta, mps, xla, ... which it cannot


def check_device_name(name: str, option: str = "--device") -> None:
    """The form only (config schemas call this at start-up): auto, cpu, cuda or cuda:N."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise Nova3DError(f"{option} {name!r} is not a device (auto, cpu, cuda, cuda:N)") from err
    if device.type not in DEVICE_TYPES:
        raise Nova3DError(f"{option} {name!r}: nova3d runs on auto, cpu, cuda or cuda:N, not {device.type}")


def resolve_device(name: str) -> torch.device:
    """auto = CUDA when available, else CPU; a bad name or missing CUDA is a Nova3DError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Nova3DError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise Nova3DError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
