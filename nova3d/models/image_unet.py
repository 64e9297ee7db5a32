"""The image-prior backbone: diffusers' `UNet2DConditionModel` (Stable Diffusion family) called as
the GTA-SVD UNet is, so the system, sampler, CFG and pipeline are shared unchanged.

`GTAImageUNet` subclasses diffusers' class and only adapts the call (no fork: every layer, the
state dict and pretrained loading are diffusers'):

* input `[N, V, 2C, h, w]` (noisy latents + condition latent, N = D*B domain-major) is flattened
  to `N*V` images; the output is unflattened back to `[N, V, C, h, w]`;
* `timestep` is SVD's EDM noise input c_noise = ¼·ln σ (nova3d.models.edm); the image UNet gets its
  own convention instead, SD's discrete index t(σ) on its 1000-step scaled-linear schedule, by
  log-σ interpolation (what diffusers' EulerDiscreteScheduler does for SD). With σ_data = 1 the EDM
  v-prediction preconditioning *is* SD 2.1's v-prediction in VP coordinates (c_in·x = √ᾱ·x0 + √(1-ᾱ)·ε,
  denoised = √ᾱ·x_vp − √(1-ᾱ)·v), so SD 2.1 is fine-tuned in its own parameterisation;
* `added_time_ids` (SVD's fps / motion bucket / noise-augmentation ids) have no counterpart in an
  image UNet and are ignored (the noise augmentation itself still applies to the condition latent);
* the condition latent enters through `conv_in.gta_cond_in`, a zero-initialised convolution added
  to the pretrained `conv_in` (the same as Zero123 / Wonder3D widening conv_in to 8 channels with
  zero weights, but pretrained keys and shapes stay as they are).

Views talk through nova3d.models.multiview. Saved and loaded like GTAUNet (nova3d.pipeline): one
safetensors file with the full state dict, GTAConfig and MultiViewConfig in its metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import UNet2DConditionModel
# diffusers finds a custom component's load method by looking its base classes up *in the
# component's module* (model_index.json names ["nova3d.models.image_unet", "GTAImageUNet"]).
from diffusers import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from safetensors import safe_open
from torch import Tensor, nn

from nova3d.models.gta import GTAConfig
from nova3d.models.multiview import MultiViewConfig, ViewCheckpoint, install_multiview
from nova3d.models.unet import MV_META_KEY, GTAWeightsFolder, read_gta_config

# Stable Diffusion's training schedule (scheduler_config.json of SD 1.x / 2.x): 1000 steps, scaled_linear.
SD_TRAIN_STEPS, SD_BETA_START, SD_BETA_END = 1000, 0.00085, 0.012


def sd_log_sigmas() -> Tensor:
    """[1000] ln σ_t of SD's schedule, σ_t = √((1 − ᾱ_t)/ᾱ_t), increasing with t (float64)."""
    betas = torch.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, SD_TRAIN_STEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()


_LOG_SIGMAS = sd_log_sigmas()


def sigma_to_sd_timestep(sigma: Tensor) -> Tensor:
    """σ (any shape) -> SD's continuous timestep in [0, 999] (clamped outside SD's σ range), as
    EulerDiscreteScheduler._sigma_to_t computes it."""
    table = _LOG_SIGMAS.to(sigma.device)
    log_sigma = sigma.double().log().clamp(table[0], table[-1])
    hi = torch.searchsorted(table, log_sigma).clamp(1, len(table) - 1)
    lo_v, hi_v = table[hi - 1], table[hi]
    return ((hi - 1) + (log_sigma - lo_v) / (hi_v - lo_v)).float()


class CondConcatConv(nn.Conv2d):
    """conv_in of a pretrained UNet plus a zero-initialised convolution of extra input channels.

    Same weights and state-dict keys as the original Conv2d (it *is* one); the extra channels go
    through `gta_cond_in` and are added, which equals a wider conv_in whose new columns start at 0."""

    def forward(self, x: Tensor) -> Tensor:
        base, extra = x[:, : self.in_channels], x[:, self.in_channels :]
        if extra.shape[1] != self.gta_cond_in.in_channels:
            raise ValueError(f"expected {self.in_channels} + {self.gta_cond_in.in_channels} input channels "
                             f"(latents + condition latent), got {x.shape[1]}")
        return super().forward(base) + self.gta_cond_in(extra)


def widen_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> None:
    conv = unet.conv_in
    w = conv.weight
    side = nn.Conv2d(extra_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False,
                     device=w.device, dtype=w.dtype)
    nn.init.zeros_(side.weight)
    conv.__class__ = CondConcatConv
    conv.gta_cond_in = side


class GTAImageUNet(GTAWeightsFolder, UNet2DConditionModel):
    """An image UNet with multi-view attention and GTA, called like the GTA-SVD UNet (module docstring)."""


    @property
    def latent_in_channels(self) -> int:
        """Channels of the UNet input: noisy latents + the condition latent."""
        return self.conv_in.in_channels + self.conv_in.gta_cond_in.in_channels

    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor,
                added_time_ids: Tensor | None = None, return_dict: bool = True, **ignored: Any):
        """sample [N, V, 2C, h, w]; timestep: c_noise = ¼·ln σ, one value or [N]; encoder_hidden_states
        [N, S, E]. Returns [N, V, C, h, w] (a tuple when return_dict is False)."""
        n, v = sample.shape[:2]
        c_noise = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1).expand(n)
        t = sigma_to_sd_timestep(torch.exp(4 * c_noise)).repeat_interleave(v)
        self.gta_views.value = v
        try:
            out = super().forward(sample.flatten(0, 1), t, encoder_hidden_states.repeat_interleave(v, dim=0),
                                  return_dict=False)[0]
        finally:
            self.gta_views.value = None
        out = out.unflatten(0, (n, v))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """diffusers' switch; by default blocks are recomputed with their forward pass's view count."""
        super().enable_gradient_checkpointing(gradient_checkpointing_func or ViewCheckpoint(self.gta_views))

    # ------------------------------------------------------------ building, saving, loading

    @classmethod
    def build(cls, unet_config: Mapping[str, Any], gta: GTAConfig, mv: MultiViewConfig) -> "GTAImageUNet":
        """Random weights from a diffusers UNet2DConditionModel config dict."""
        return install_image_gta(cls.from_config(dict(unet_config)), gta, mv)

    @classmethod
    def _build_on_meta(cls, config: Mapping[str, Any], weights: Path) -> "GTAImageUNet":
        gta, mv = read_gta_config(weights), read_multiview_config(weights)
        if mv is None:
            raise ValueError(f"{weights} stores no MultiViewConfig in its metadata")
        return install_image_gta(cls.from_config(config), gta, mv)


def install_image_gta(unet: UNet2DConditionModel, gta: GTAConfig, mv: MultiViewConfig) -> GTAImageUNet:
    """Make a loaded UNet2DConditionModel a GTAImageUNet (class only: weights untouched), widen its
    conv_in for the condition latent and install multi-view attention + GTA. Exactly the pretrained
    UNet at step 0."""
    if getattr(unet, "gta_config", None) is not None:
        raise RuntimeError("GTA is already installed on this UNet")
    if not isinstance(unet, GTAImageUNet):
        unet.__class__ = GTAImageUNet
    widen_conv_in(unet, unet.config.in_channels)
    return install_multiview(unet, gta, mv)


def load_image_unet(pretrained: str | os.PathLike, gta: GTAConfig, mv: MultiViewConfig, subfolder: str | None = "unet",
                    torch_dtype: torch.dtype | None = None, **kwargs: Any) -> GTAImageUNet:
    """Pretrained SD 2.1 / sd-image-variations UNet from a diffusers folder (or hub id when online), then GTA."""
    if subfolder:
        kwargs["subfolder"] = subfolder
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return install_image_gta(UNet2DConditionModel.from_pretrained(os.fspath(pretrained), **kwargs), gta, mv)


def read_multiview_config(path: str | os.PathLike) -> MultiViewConfig | None:
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(MV_META_KEY)
    return None if raw is None else MultiViewConfig(**json.loads(raw))

