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


def toy_unet_config() -> dict[str, Any]:
    """The toy recipe's UNet (experiments/toy.yaml): SVD's block types at 64 channels for 16x16x4
    latents of 64² views, spatial/temporal attention (and so GTA) at 8² and 4², about 1 s a training
    step on one CPU core for 16 views x 2 domains (docs/benchmarks.md, "Toy recipe").

    Why these widths: diffusers' GroupNorm has 32 groups, so 32-channel layers are instance
    normalisation, which drops each image's colour offsets; and attention at 16² cost 0.45 s of a
    1.47 s step. cross_attention_dim is the toy CLIP's projection (nova3d.models.autoencoder)."""
    addition_time_embed_dim = 16
    return {
        **tiny_unet_config(),
        "addition_time_embed_dim": addition_time_embed_dim,
        "block_out_channels": [64, 64, 64],
        "down_block_types": ["DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                             "CrossAttnDownBlockSpatioTemporal"],
        "up_block_types": ["CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"],
        "num_attention_heads": [2, 2, 2],
        "num_frames": 16,
        "projection_class_embeddings_input_dim": 3 * addition_time_embed_dim,
        "sample_size": 16,
    }
