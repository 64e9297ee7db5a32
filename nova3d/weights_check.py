"""Model weights checked when they load: one line naming the file and what is wrong with it.

Two steps, used by every command that loads a saved Nova3DPipeline (generate, image-to-3d, the
toy chain):
- `check_pipeline_folder(model)`, before anything heavy: the folder (not a file, not missing),
  model_index.json (valid JSON, the Nova3DPipeline class, numeric orbit values, a sub-folder for
  every component it names) and every `*/*.safetensors` (a readable header, not empty, not cut
  off; only the header is read).
- `check_loaded_weights(pipe, root)`, after loading: every parameter and buffer is finite. Bytes
  overwritten inside a safetensors file (0xFF...) decode as NaN; without this the pipeline
  sampled 16 blank views and exited 0, and image-to-3d blamed "empty masks".
`describe_load_error(root, err)` turns what diffusers/torch raise while loading (a config whose
shapes do not match the weights, a missing key) into the same kind of line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from nova3d.errors import Nova3DError

PIPELINE_CLASS = "Nova3DPipeline"
INDEX_FILE = "model_index.json"
# model_index.json values the orbit and the sampler need: (name, whole number?, smallest value)
NUMERIC_KEYS = (("resolution", True, 8), ("num_frames", True, 1), ("fov_deg", False, 1e-3), ("radius", False, 1e-6))
MAX_HEADER = 100_000_000


def check_safetensors(path: Path) -> None:
    """Nova3DError naming `path` if it is empty, cut off or not safetensors: its header says
    where every tensor ends, so this reads only the header, not the weights."""
    size = path.stat().st_size
    if size == 0:
        raise Nova3DError(f"{path}: empty file (0 bytes); copy or export the model again")
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len < MAX_HEADER else None
    except (OSError, ValueError) as err:
        raise Nova3DError(f"{path}: not a safetensors file (unreadable header: {err})") from err
    if not isinstance(header, dict):
        raise Nova3DError(f"{path}: not a safetensors file (no header)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise Nova3DError(f"{path}: not a safetensors file (bad header: {err!r})") from err
    expected = 8 + header_len + end
    if size < expected:
        raise Nova3DError(f"{path}: truncated ({size} of {expected} bytes); copy or export the model again")


def _check_index(root: Path, config: dict) -> None:
    index = root / INDEX_FILE
    class_name = config.get("_class_name")
    if class_name != PIPELINE_CLASS:
        raise Nova3DError(f"{index}: names a {class_name} pipeline, not a {PIPELINE_CLASS} (save one with "
                          "Nova3DPipeline.save_pretrained)")
    for key, whole, low in NUMERIC_KEYS:
        if key not in config:
            raise Nova3DError(f"{index}: lacks {key!r}")
        value = config[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (whole and value != int(value)) or value < low:
            kind = "a whole number" if whole else "a number"
            raise Nova3DError(f"{index}: {key} must be {kind} >= {low}, got {value!r}")
    for name, value in config.items():
        if isinstance(value, list) and len(value) == 2 and value[0] and not (root / name).is_dir():
            raise Nova3DError(f"{index}: names component {name!r} ({value[1]}), but {root / name} is missing")


def check_pipeline_folder(model: str | Path) -> tuple[Path, dict]:
    """(model folder, its model_index.json) or a Nova3DError naming the file and the problem."""
    root = Path(model).expanduser()
    if root.is_file():
        raise Nova3DError(f"--model {root} is a file; give the pipeline folder (with {INDEX_FILE})")
    if not root.is_dir():
        raise Nova3DError(f"model folder {root} does not exist")
    index = root / INDEX_FILE
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise Nova3DError(f"{root} is not a pipeline folder: cannot read {index.name} ({err})") from err
    if not isinstance(config, dict):
        raise Nova3DError(f"{index}: not a JSON object")
    _check_index(root, config)
    for weights in sorted(root.glob("*/*.safetensors")):
        check_safetensors(weights)
    return root, config


def _weights_file(root: Path, component: str) -> str:
    files = sorted((root / component).glob("*.safetensors"))
    return str(files[0]) if len(files) == 1 else str(root / component)


def check_loaded_weights(pipe, root: str | Path) -> None:
    """Every parameter and buffer of the pipeline's modules is finite, else a Nova3DError naming
    the weights file and the first bad tensor. One pass over memory the load just filled."""
    import torch

    root = Path(root)
    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise Nova3DError(f"{_weights_file(root, component)}: {bad} non-finite value(s) in {name} "
                                  "(the file is corrupt, or training diverged); copy or export the model again")


def describe_load_error(root: str | Path, err: BaseException) -> Nova3DError:
    """One line for an exception raised while loading the pipeline in `root`."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "size mismatch" in text:
        lines = [line.strip() for line in text.splitlines() if "size mismatch" in line]
        detail = lines[0] if lines else first
        return Nova3DError(f"{root}: a component's config.json does not match its weights ({detail})")
    return Nova3DError(f"cannot load the pipeline from {root}: {first}")
