"""UNet configs for `UNetSpatioTemporalConditionModel`: the real SVD-xt one and a tiny test one.

Functions return fresh dicts (callers may edit them), so nothing mutable is shared at module level.
"""
from __future__ import annotations

from typing import Any


def svd_xt_unet_config() -> dict[str, Any]:
    """`unet/config.json` of stabilityai/stable-video-diffusion-img2vid-xt, written out.

    Lets us build the exact architecture (e.g. on the meta device, to check that real weights
    load) without downloading anything. `num_frames` is only the pretraining default; the UNet
    runs on any frame count (we use 16 views).
    """
    return {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "addition_time_embed_dim": 256,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": [
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ],
        "in_channels": 8,
        "layers_per_block": 2,
        "num_attention_heads": [5, 10, 20, 20],
        "num_frames": 25,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 768,
        "sample_size": 96,
        "transformer_layers_per_block": 1,
        "up_block_types": [
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ],
    }


def tiny_unet_config() -> dict[str, Any]:
    """A CPU-seconds UNet with the same block types (spatial + temporal attention at 2 widths).

    GroupNorm uses 32 groups, so channels must be multiples of 32. The added-time projection
    input is 3 ids (fps, motion bucket, noise aug) x `addition_time_embed_dim`.
    """
    addition_time_embed_dim = 8
    return {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "addition_time_embed_dim": addition_time_embed_dim,
        "block_out_channels": [32, 64],
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
        "in_channels": 8,
        "layers_per_block": 1,
        "num_attention_heads": [2, 4],
        "num_frames": 4,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 3 * addition_time_embed_dim,
        "sample_size": 16,
        "transformer_layers_per_block": 1,
        "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
    }
