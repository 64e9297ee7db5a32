"""Build / load the GTA-UNet (diffusers' SVD UNet + GTA processors) and save / load its weights.

Checkpoint format (`save_gta_weights`): ONE safetensors file with the **full** UNet state dict
(pretrained weights, which are fine-tuned too, plus the `gta_*` ones), and the GTAConfig as JSON
in the safetensors metadata. Rebuild the model the same way it was trained (`load_gta_unet` or
`build_gta_unet` with that GTAConfig), then `load_gta_weights`. Nothing is unpickled.

Don't `save_pretrained` a GTA-UNet and reload it with diffusers: diffusers would rebuild plain
processors and drop the `gta_*` weights as unexpected keys.

Gradient checkpointing (issue 14): diffusers' `enable_gradient_checkpointing` checkpoints the
resnets and the *spatial* transformer blocks of SVD's UNet, but not the temporal transformer
blocks, where temporal GTA lives. `checkpoint_temporal_blocks` (applied by every builder here and
in nova3d.pipeline) turns each `TemporalBasicTransformerBlock` into `CheckpointedTemporalBlock`:
same weights and outputs, plus the `gradient_checkpointing` flag that diffusers' own
enable/disable switch flips, so `model.gradient_checkpointing: true` covers them too.
bench/memory_ladder.py measures what that saves.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention import TemporalBasicTransformerBlock
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from nova3d.models.gta import GTAConfig, install_gta

_META_KEY = "nova3d_gta_config"
# An image-prior UNet's MultiViewConfig (nova3d.models.image_unet), stored as JSON beside the GTAConfig.
MV_META_KEY = "nova3d_multiview_config"


WEIGHTS_NAME = "gta_unet.safetensors"  # the one weights file of a GTA-UNet folder (pipeline unet/)


class CheckpointedTemporalBlock(TemporalBasicTransformerBlock):
    """A TemporalBasicTransformerBlock that recomputes its activations in backward when
    `gradient_checkpointing` is on (set by diffusers' enable_gradient_checkpointing)."""

    gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, num_frames: int,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(super().forward, hidden_states, num_frames, encoder_hidden_states, use_reentrant=False)
        return super().forward(hidden_states, num_frames, encoder_hidden_states)


def checkpoint_temporal_blocks(unet: torch.nn.Module) -> int:
    """Make `unet`'s temporal transformer blocks checkpointable (in place); returns how many.

    The flag follows the UNet's: if checkpointing is already on, the blocks are switched on too."""
    enabled = bool(getattr(unet, "is_gradient_checkpointing", False))
    count = 0
    for m in unet.modules():
        if type(m) is TemporalBasicTransformerBlock:
            m.__class__ = CheckpointedTemporalBlock
            m.gradient_checkpointing = enabled
            count += 1
    return count


def build_gta_unet(unet_config: Mapping[str, Any], gta: GTAConfig) -> UNetSpatioTemporalConditionModel:
    """Randomly initialised UNet from a diffusers config dict (keys starting with `_` ignored)."""
    unet = UNetSpatioTemporalConditionModel.from_config(dict(unet_config))
    checkpoint_temporal_blocks(unet)
    return install_gta(unet, gta)


def load_gta_unet(
    pretrained: str | os.PathLike,
    gta: GTAConfig,
    subfolder: str | None = "unet",
    torch_dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> UNetSpatioTemporalConditionModel:
    """Pretrained SVD(-xt) UNet from a diffusers folder (or hub id when online), then GTA.

    GTA is installed after loading so its Q/K/V copy the pretrained ones and its outputs start
    at zero: the result computes exactly what the pretrained UNet does.
    """
    kwargs = dict(from_pretrained_kwargs)
    if subfolder:
        kwargs["subfolder"] = subfolder
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    unet = UNetSpatioTemporalConditionModel.from_pretrained(os.fspath(pretrained), **kwargs)
    checkpoint_temporal_blocks(unet)
    return install_gta(unet, gta)


def save_gta_weights(unet: torch.nn.Module, path: str | os.PathLike) -> None:
    """Full UNet state dict -> safetensors, with the installed GTAConfig in the metadata."""
    gta = getattr(unet, "gta_config", None)
    metadata = {"format": "pt"}
    if gta is not None:
        metadata[_META_KEY] = json.dumps(dataclasses.asdict(gta))
    mv = getattr(unet, "mv_config", None)
    if mv is not None:
        metadata[MV_META_KEY] = json.dumps(dataclasses.asdict(mv))
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, os.fspath(path), metadata=metadata)


class GTAWeightsFolder:
    """save_pretrained / from_pretrained of a GTA-UNet folder (config.json + WEIGHTS_NAME, every config
    the architecture needs in the weights' metadata), shared by the video and the image UNet. A class
    using it defines `_build_on_meta(config, weights)`: the architecture, with its additions installed."""

    WEIGHTS_NAME = WEIGHTS_NAME

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **ignored) -> None:
        """config.json + WEIGHTS_NAME (full state dict, the installed configs in the metadata)."""
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        save_gta_weights(self, Path(save_directory) / self.WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **ignored):
        """Load a `save_pretrained` folder. Loader options diffusers passes (device_map, variant, ...) are ignored."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        weights = folder / cls.WEIGHTS_NAME
        if not weights.is_file():
            raise OSError(f"{folder} has no {cls.WEIGHTS_NAME} (write it with {cls.__name__}.save_pretrained)")
        if read_gta_config(weights) is None:
            raise ValueError(f"{weights} stores no GTAConfig in its metadata")
        with torch.device("meta"):  # no allocation: every entry is overwritten by the strict load
            unet = cls._build_on_meta(cls.load_config(folder), weights)
        unet.to_empty(device="cpu")
        load_gta_weights(unet, weights, strict=True)
        if torch_dtype is not None:
            unet.to(torch_dtype)
        return unet.eval()


def cast_weights_file(path: str | os.PathLike, dtype: torch.dtype) -> None:
    """Rewrite a safetensors file with its floating-point tensors in `dtype`, metadata kept (e.g.
    float16 for shipping: loading casts back to the model's dtype, load_gta_weights)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_gta_config(path: str | os.PathLike) -> GTAConfig | None:
    """The GTAConfig stored by `save_gta_weights`, or None if the file has none."""
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    return None if raw is None else GTAConfig.from_dict(json.loads(raw))


def load_gta_weights(
    unet: torch.nn.Module, path: str | os.PathLike, strict: bool = True
) -> Any:  # torch's _IncompatibleKeys named tuple
    """Load a `save_gta_weights` file into an already built GTA-UNet (same GTAConfig).

    Returns torch's (missing_keys, unexpected_keys). Tensors are cast to the model's dtype.
    """
    stored, installed = read_gta_config(path), getattr(unet, "gta_config", None)
    if stored is not None and installed is not None and stored != installed:
        raise ValueError(f"weights were saved with {stored}, but this UNet has {installed}")
    # Layouts with the same shapes (dense / orbit multi-view attention) would load silently otherwise.
    with safe_open(os.fspath(path), framework="pt") as f:
        raw_mv = (f.metadata() or {}).get(MV_META_KEY)
    mv = getattr(unet, "mv_config", None)
    if raw_mv is not None and mv is not None and json.loads(raw_mv) != dataclasses.asdict(mv):
        raise ValueError(f"weights were saved with multi-view {raw_mv}, but this UNet has {mv}")
    device = next(unet.parameters()).device
    state = load_file(os.fspath(path), device=str(device))
    return unet.load_state_dict(state, strict=strict)
