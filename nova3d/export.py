"""`nova3d export`: a training checkpoint -> a Nova3DPipeline folder that `nova3d generate --model` loads.

Input: a Lightning `.ckpt` written by nova3d.train, or a run directory (or its `checkpoints/`
folder), which means its `last.ckpt` (`which="best"`: `best.ckpt`). The file is read with
`torch.load(weights_only=True)`: tensors and plain containers only, no arbitrary unpickling.

The system is rebuilt from the config stored in the checkpoint, so the frozen CLIP and VAE are
the ones training used (`model.pretrained`'s folder, or the same seeded random architecture);
the UNet weights load strictly. With EMA (default: whenever the checkpoint holds EMA weights)
the averaged weights replace the raw ones, as validation uses them.

Output: `Nova3DPipeline.save_pretrained` — model_index.json, unet/ (config.json +
gta_unet.safetensors with the GTAConfig), vae/ and image_encoder/ (safetensors), scheduler/
(SVD-xt's EulerDiscreteScheduler) and feature_extractor/ (CLIP mean/std). The pipeline's
frames, resolution, normal frame and SVD time ids are the run's. Written through
nova3d.atomic.staged_folder, so a folder named OUT is always complete, and --overwrite keeps the
old pipeline until the new one is whole.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nova3d.atomic import check_writable, staged_folder
from nova3d.errors import Nova3DError

CHECKPOINT_NAMES = {"last": "last.ckpt", "best": "best.ckpt"}


@dataclass(frozen=True)
class ExportResult:
    out: Path  # the pipeline folder
    checkpoint: Path  # the .ckpt it came from
    global_step: int
    ema: bool  # whether the EMA weights were exported


def resolve_checkpoint(source: str | Path, which: str = "last") -> Path:
    """A .ckpt file, or a run directory / its checkpoints folder -> checkpoints/<which>.ckpt."""
    if which not in CHECKPOINT_NAMES:
        raise Nova3DError(f"checkpoint choice must be one of {sorted(CHECKPOINT_NAMES)}, got {which!r}")
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise Nova3DError(f"{path} does not exist (expected a .ckpt file or a run directory)")
    name = CHECKPOINT_NAMES[which]
    for candidate in (path / "checkpoints" / name, path / name):
        if candidate.is_file():
            return candidate
    raise Nova3DError(f"{path} has no checkpoints/{name} (is it a run directory of nova3d.train?)")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and then `{`."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict, or a one-line Nova3DError if it is unreadable or not nova3d's."""
    if _is_safetensors(path):
        raise Nova3DError(f"{path}: a safetensors weights file (part of a pipeline folder?), not a training "
                          "checkpoint; export reads the .ckpt files nova3d.train writes")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip; its legacy reader
        # would take any other bytes as a pickle and fail anywhere (KeyError, IndexError, ...)
        raise Nova3DError(f"{path}: not a readable checkpoint (not the zip archive torch.save writes: "
                          "another kind of file, or one cut off)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "weights only load failed" in reason.lower():  # PyTorch's hint to unpickle anything: unsafe, and not ours
            reason = "it holds objects other than tensors, so it was not written by nova3d.train"
        raise Nova3DError(f"{path}: not a readable checkpoint ({reason})") from err
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise Nova3DError(f"{path}: not a nova3d training checkpoint (no state_dict or hyper_parameters.config)")
    return ckpt


def build_pipeline(system):  # MultiViewDiffusion -> Nova3DPipeline (imports kept lazy for the CLI)
    """The sampling pipeline around a trained system's UNet and frozen CLIP/VAE (shared, not copied)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPImageProcessor

    from nova3d.models.edm import svd_xt_scheduler_config
    from nova3d.pipeline import Nova3DPipeline

    cfg, cond = system.cfg, system.conditioner
    feature_extractor = CLIPImageProcessor(image_mean=cond.clip_mean.flatten().tolist(),
                                           image_std=cond.clip_std.flatten().tolist())
    return Nova3DPipeline(
        system.unet, cond.vae, cond.image_encoder, EulerDiscreteScheduler.from_config(svd_xt_scheduler_config()),
        feature_extractor, num_frames=cfg.data.num_views, resolution=cfg.data.resolution,
        normal_frame=cfg.data.normal_frame, fps=cfg.system.fps, motion_bucket_id=cfg.system.motion_bucket_id,
        noise_aug_strength=cfg.system.noise_aug_strength)


def export_checkpoint(source: str | Path, out: str | Path, ema: Optional[bool] = None, which: str = "last",
                      overwrite: bool = False, unet_dtype: Optional[torch.dtype] = None) -> ExportResult:
    """Write the pipeline of a training checkpoint to `out`. ema: None = use EMA weights when saved.
    unet_dtype: store the UNet weights in this dtype (e.g. torch.float16 to halve the folder; they load
    back into the pipeline's dtype); None keeps the training dtype."""
    from nova3d.systems.mv_diffusion import MultiViewDiffusion

    ckpt_path = resolve_checkpoint(source, which)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise Nova3DError(f"--out {out} is a file, not a folder")
    if out.exists() and not overwrite:
        raise Nova3DError(f"{out} already exists; remove it, choose another --out or pass --overwrite")
    check_writable(out)
    ckpt = read_checkpoint(ckpt_path)
    has_ema = bool(ckpt.get("ema", {}).get("shadow"))
    if ema and not has_ema:
        raise Nova3DError(f"{ckpt_path}: --ema asked for, but the run saved no EMA weights (system.ema_decay)")
    use_ema = has_ema if ema is None else ema
    try:
        system = MultiViewDiffusion.from_checkpoint(ckpt, use_ema=use_ema)
    except Nova3DError as err:
        raise Nova3DError(f"{ckpt_path}: {err}") from err
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise Nova3DError(f"{ckpt_path}: its weights do not fit the model its config describes ({reason})") from err
    pipe = build_pipeline(system)
    with staged_folder(out) as partial:  # with --overwrite, the old pipeline stays until the new one is whole
        pipe.save_pretrained(partial)  # safetensors for every model component
        if unet_dtype is not None:
            from nova3d.models.unet import cast_weights_file
            from nova3d.pipeline import GTAUNet

            cast_weights_file(partial / "unet" / GTAUNet.WEIGHTS_NAME, unet_dtype)
    return ExportResult(out, ckpt_path, int(ckpt.get("global_step", 0)), use_ema)
