"""The one place a `--device` / `device:` value (auto, cpu, cuda, cuda:N) becomes a torch device."""
from __future__ import annotations

import torch

from nova3d.errors import Nova3DError


def resolve_device(name: str) -> torch.device:
    """auto = CUDA when available, else CPU; a bad name or missing CUDA is a Nova3DError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise Nova3DError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Nova3DError(f"--device {name}: CUDA is not available on this machine")
    return device
