"""The toy recipe's conditioner: a small VAE trained here, plus CLIP.

`gta_full` keeps SVD-xt's frozen VAE and CLIP. The toy recipe has no pretrained weights, so its
VAE is trained on toy RGB and normal views (nova3d.train_vae, experiments/autoencoder/*.yaml)
and saved with save_pretrained as the `vae/` of a conditioner folder that
nova3d.models.conditioning.load_conditioning reads like an SVD folder (`model.conditioner`).

Which VAE (`model.kind`): "kl", diffusers' per-image AutoencoderKL (the toy default), or
"temporal", SVD's AutoencoderKLTemporalDecoder. Both encode per image to the same latents the
GTA-UNet takes; only decoding differs (SVD's mixes neighbouring frames). Measured here
(2026-12-04, one toy batch of 2 x 8 views at 64², same widths 32/32/64, Adam 1e-3): after 60
steps the temporal decoder reconstructs at L1 0.21 and AutoencoderKL at 0.11, ~20 % faster a step,
so within the toy recipe's CPU minutes AutoencoderKL is the one that learns.

The image condition: the GTA-UNet sees the input view twice, as its VAE latent concatenated to
every frame (8 input channels) and as a CLIP embedding in cross-attention. Here the latent carries
the image (the trained VAE's code of it); the CLIP is a tiny random one, frozen and saved beside
the VAE, so the embedding is a fixed random projection of the image: deterministic, and harmless,
but no semantic prior. Training a CLIP is out of the toy recipe's CPU hour; the conditioning
pathway (resize, normalisation, cross-attention, dropout for guidance) is the real one.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

# The schema lives in nova3d.config (as every experiment's); imported here for the code that builds from it.
from nova3d.config import VAE_KINDS, AutoencoderExperimentConfig, AutoencoderModelConfig  # noqa: F401
from nova3d.errors import Nova3DError
from nova3d.models.conditioning import tiny_clip_vision_config
from nova3d.models.temporal_conv import use_fast_temporal_convs


# A fresh diffusers VAE's posterior has log-variance ~0: unit noise on latents of magnitude ~0.1, so
# the decoder learns to ignore them and paints the data mean (measured: toy L1 stuck at 0.4-0.9 for
# 500 steps). Starting at e^-10 (std 0.007), as near-deterministic as SD's trained VAE, the code
# carries the image from the first step; the KL term may raise it as training goes on.
LOGVAR_INIT = -10.0


def build_vae(cfg: AutoencoderModelConfig, resolution: int) -> AutoencoderKL | AutoencoderKLTemporalDecoder:
    """A random VAE of `cfg`'s kind and size (GroupNorm: channels multiples of 32)."""
    if cfg.kind not in VAE_KINDS:
        raise Nova3DError(f"model.kind must be one of {VAE_KINDS}, got {cfg.kind!r}")
    levels = len(cfg.block_out_channels)
    common = dict(block_out_channels=tuple(cfg.block_out_channels), down_block_types=("DownEncoderBlock2D",) * levels,
                  in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                  layers_per_block=cfg.layers_per_block, sample_size=resolution, scaling_factor=1.0,
                  force_upcast=False)
    if cfg.kind == "kl":
        vae = AutoencoderKL(up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=cfg.norm_num_groups,
                            **common)
    else:
        vae = AutoencoderKLTemporalDecoder(**common)
    with torch.no_grad():  # posterior log-variance starts at LOGVAR_INIT (why: the constant's comment)
        vae.quant_conv.weight[cfg.latent_channels:] = 0
        vae.quant_conv.bias[cfg.latent_channels:] = LOGVAR_INIT
    use_fast_temporal_convs(vae)
    return vae


def build_clip(cfg: AutoencoderModelConfig, seed: int) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """The toy recipe's frozen random CLIP (module docstring) and an SVD-style feature extractor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**tiny_clip_vision_config(),
                                                                 "projection_dim": cfg.clip_projection_dim}))
    return clip.eval(), CLIPImageProcessor()
