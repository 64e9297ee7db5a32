"""UNet configs for the image-prior backbone (`UNet2DConditionModel`, the Stable Diffusion family).

The real ones are written out from the hub's `unet/config.json` (no download here), so the exact
architectures can be built on the meta device and checked against pretrained keys. The tiny and toy
ones mirror nova3d.models.svd_configs (same widths, heads and attention levels) so that the image
and video backbones differ in the prior, not in size. `in_channels` is the pretrained 4: the
condition latent enters through a zero-initialised side convolution (nova3d.models.image_unet).
Functions return fresh dicts.
"""
from __future__ import annotations

from typing import Any

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def _sd_common() -> dict[str, Any]:
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "down_block_types": list(_SD_DOWN),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "up_block_types": list(_SD_UP),
    }


def sd21_unet_config() -> dict[str, Any]:
    """`unet/config.json` of stabilityai/stable-diffusion-2-1 (768-v: v-prediction, OpenCLIP-H width 1024).

    SVD was initialised from this model, so its spatial layers share these shapes, and its
    cross_attention_dim (1024) is the projection of SVD's CLIP ViT-H image encoder."""
    return {**_sd_common(), "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False,
            "sample_size": 96, "upcast_attention": True, "use_linear_projection": True}


def sd_image_variations_unet_config() -> dict[str, Any]:
    """`unet/config.json` of lambdalabs/sd-image-variations-diffusers (SD 1.x, CLIP ViT-L/14 image
    embedding of width 768 through cross-attention; Wonder3D's base; epsilon-prediction)."""
    return {**_sd_common(), "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64}


def tiny_image_unet_config() -> dict[str, Any]:
    """The image counterpart of svd_configs.tiny_unet_config: widths 32/64, attention at the first level."""
    return {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],  # diffusers' name for the number of heads (as SD 2.1's config)
        "sample_size": 16,
        "use_linear_projection": True,
        "upcast_attention": True,
    }


def toy_image_unet_config() -> dict[str, Any]:
    """The image counterpart of svd_configs.toy_unet_config: 64 channels at 3 levels, attention at
    8² and 4² for 16x16 latents, 2 heads, cross_attention_dim of the toy CLIP (32)."""
    return {
        **tiny_image_unet_config(),
        "block_out_channels": [64, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [2, 2, 2],
        "sample_size": 16,
    }
