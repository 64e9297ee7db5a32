"""Build the trainable GTA-UNet and the frozen Conditioner (CLIP + VAE) from a ModelConfig.

`model.backbone` picks the UNet family from BACKBONES (a plain dict): "svd" (the video prior) or
"sd_image" (an image prior with multi-view attention, nova3d.models.image_unet). Both are called
the same way (nova3d.models.denoiser.unet_forward), so everything downstream is shared.

`model.pretrained` set: both come from that SVD(-xt) diffusers folder (or hub id when online).
`model.pretrained` null: random weights of `model.architecture`, chosen from ARCHITECTURES
(a plain dict, DESIGN.md §3.3): "tiny" for CPU tests, "toy" for the toy recipe, "svd_xt" for the
real shapes without weights (benchmarks, memory checks). `model.conditioner` set: the frozen CLIP
+ VAE come from that folder instead (the toy recipe's trained VAE, nova3d.train_vae). Nothing here
downloads unless a path is a hub id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from nova3d.config import ModelConfig
from nova3d.errors import Nova3DError
from nova3d.models.conditioning import Conditioner, build_tiny_conditioner, load_conditioning
from nova3d.models.gta import GTA_KEYS, GTAConfig
from nova3d.models.image_configs import (sd21_unet_config, sd_image_variations_unet_config, tiny_image_unet_config,
                                         toy_image_unet_config)
from nova3d.models.image_unet import GTAImageUNet, load_image_unet
from nova3d.models.multiview import MV_LAYOUTS, MultiViewConfig
from nova3d.models.svd_configs import svd_xt_unet_config, tiny_unet_config, toy_unet_config
from nova3d.models.temporal_conv import use_fast_temporal_convs
from nova3d.models.unet import build_gta_unet, load_gta_unet

DOMAINS = ("rgb", "normal")  # every known domain, in the UNet's domain-major order (0 = RGB)


def svd_xt_clip_config() -> dict[str, Any]:
    """`image_encoder/config.json` of SVD-xt (OpenCLIP ViT-H/14 vision tower), written out."""
    return dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


def svd_xt_vae_config() -> dict[str, Any]:
    """`vae/config.json` of SVD-xt (AutoencoderKLTemporalDecoder, 8x downsampling), written out."""
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
                scaling_factor=0.18215, force_upcast=True)


def build_svd_xt_conditioner(seed: int = 0) -> Conditioner:
    """Random CLIP ViT-H + SVD VAE with the real shapes (about 0.7 B parameters)."""
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**svd_xt_clip_config()))
    vae = AutoencoderKLTemporalDecoder(**svd_xt_vae_config())
    return Conditioner(image_encoder, vae, CLIPImageProcessor())


def sd_image_variations_clip_config() -> dict[str, Any]:
    """`image_encoder/config.json` of lambdalabs/sd-image-variations-diffusers (CLIP ViT-L/14), written out."""
    return dict(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def sd_vae_config() -> dict[str, Any]:
    """`vae/config.json` of Stable Diffusion (AutoencoderKL, 8x downsampling), written out."""
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, sample_size=512, scaling_factor=0.18215)


def build_sd_image_variations_conditioner(seed: int = 0) -> Conditioner:
    """Random CLIP ViT-L + SD VAE with sd-image-variations' shapes."""
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**sd_image_variations_clip_config()))
    return Conditioner(image_encoder, AutoencoderKL(**sd_vae_config()), CLIPImageProcessor())


@dataclass(frozen=True)
class Architecture:
    """A random-weights model family: the UNet config and a matching Conditioner builder."""

    unet_config: Callable[[], dict[str, Any]]
    build_conditioner: Callable[[int], Conditioner]  # seed -> Conditioner


ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(tiny_unet_config, build_tiny_conditioner),
    "svd_xt": Architecture(svd_xt_unet_config, build_svd_xt_conditioner),
    # The toy recipe's UNet; its conditioner is the trained one named by model.conditioner (the random
    # tiny one only stands in when none is named, e.g. for shape tests).
    "toy": Architecture(toy_unet_config, build_tiny_conditioner),
}


# The image prior's random architectures: the same sizes as ARCHITECTURES' (image_configs says how).
IMAGE_ARCHITECTURES: dict[str, Architecture] = {
    "tiny": Architecture(tiny_image_unet_config, build_tiny_conditioner),
    "toy": Architecture(toy_image_unet_config, build_tiny_conditioner),
    # SVD-xt's CLIP ViT-H (projection 1024 = SD 2.1's cross_attention_dim) and VAE (SD 2.1's latent space).
    "sd21": Architecture(sd21_unet_config, build_svd_xt_conditioner),
    "sd_image_variations": Architecture(sd_image_variations_unet_config, build_sd_image_variations_conditioner),
}


def multiview_config(cfg: ModelConfig) -> MultiViewConfig:
    layout = cfg.multiview or MultiViewConfig.layout
    if layout not in MV_LAYOUTS:
        raise Nova3DError(f"model.multiview must be one of {list(MV_LAYOUTS)}, got {cfg.multiview!r}")
    return MultiViewConfig(layout=layout)


def _build_svd(unet_config: dict[str, Any], gta: GTAConfig, cfg: ModelConfig) -> torch.nn.Module:
    return build_gta_unet(unet_config, gta)


def _load_svd(pretrained: str, gta: GTAConfig, cfg: ModelConfig) -> torch.nn.Module:
    return load_gta_unet(pretrained, gta)


def _build_image(unet_config: dict[str, Any], gta: GTAConfig, cfg: ModelConfig) -> torch.nn.Module:
    return GTAImageUNet.build(unet_config, gta, multiview_config(cfg))


def _load_image(pretrained: str, gta: GTAConfig, cfg: ModelConfig) -> torch.nn.Module:
    return load_image_unet(pretrained, gta, multiview_config(cfg))


@dataclass(frozen=True)
class Backbone:
    """A UNet family: its random architectures and how to build / load it with GTA installed."""

    architectures: dict[str, Architecture]
    build: Callable[[dict[str, Any], GTAConfig, ModelConfig], torch.nn.Module]  # random weights from a config
    load: Callable[[str, GTAConfig, ModelConfig], torch.nn.Module]  # a diffusers folder (subfolder unet/)


BACKBONES: dict[str, Backbone] = {
    "svd": Backbone(ARCHITECTURES, _build_svd, _load_svd),
    "sd_image": Backbone(IMAGE_ARCHITECTURES, _build_image, _load_image),
}


@dataclass
class DiffusionComponents:
    unet: UNetSpatioTemporalConditionModel | GTAImageUNet  # with GTA installed (unet.gta_config)
    conditioner: Conditioner  # frozen


def check_domains(domains: list[str]) -> None:
    """Nova3DError unless `domains` is a subsequence of DOMAINS starting with "rgb" (domain 0 = RGB)."""
    if not domains or domains[0] != "rgb" or list(domains) != [d for d in DOMAINS if d in domains]:
        raise Nova3DError(f"model.domains must start with 'rgb' and keep the order {list(DOMAINS)}, "
                          f"got {list(domains)}")


def gta_config(cfg: ModelConfig) -> GTAConfig:
    check_domains(cfg.domains)
    if cfg.gta_keys not in GTA_KEYS:
        raise Nova3DError(f"model.gta_keys must be one of {list(GTA_KEYS)}, got {cfg.gta_keys!r}")
    return GTAConfig(spatial=cfg.gta_spatial, temporal=cfg.gta_temporal, num_domains=len(cfg.domains),
                     keys=cfg.gta_keys)


def check_compatible(unet: torch.nn.Module, conditioner: Conditioner) -> None:
    """The UNet must take [noisy latent, condition latent] channels and the CLIP embedding size."""
    c = unet.config
    in_channels = getattr(unet, "latent_in_channels", c.in_channels)  # the image UNet's conv_in is widened
    if in_channels != 2 * conditioner.latent_channels or c.cross_attention_dim != conditioner.embed_dim:
        raise Nova3DError(
            f"UNet (in_channels={in_channels}, cross_attention_dim={c.cross_attention_dim}) does not fit the "
            f"conditioner (latent_channels={conditioner.latent_channels}, embed_dim={conditioner.embed_dim})")


def build_components(cfg: ModelConfig, seed: int = 0) -> DiffusionComponents:
    """GTA-UNet + Conditioner as `cfg` asks. Random weights are drawn from `seed` (global RNG untouched)."""
    gta = gta_config(cfg)
    backbone = BACKBONES.get(cfg.backbone)
    if backbone is None:
        raise Nova3DError(f"model.backbone must be one of {sorted(BACKBONES)}, got {cfg.backbone!r}")
    if cfg.backbone == "svd" and cfg.multiview is not None:  # SVD's views meet in its own temporal layers
        raise Nova3DError(f"model.multiview is for backbone sd_image only; backbone svd needs null, got {cfg.multiview!r}")
    conditioner = load_conditioning(cfg.conditioner) if cfg.conditioner else None
    if cfg.pretrained:
        try:
            unet = backbone.load(cfg.pretrained, gta, cfg)
        except (OSError, ValueError) as err:
            raise Nova3DError(f"cannot load the {cfg.backbone} UNet from {cfg.pretrained}: {err}") from err
        conditioner = conditioner or load_conditioning(cfg.pretrained)
    else:
        arch = backbone.architectures.get(cfg.architecture)
        if arch is None:
            raise Nova3DError(f"model.architecture must be one of {sorted(backbone.architectures)} for backbone "
                              f"{cfg.backbone!r}, got {cfg.architecture!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = backbone.build(arch.unet_config(), gta, cfg)
            conditioner = conditioner or arch.build_conditioner(seed)
    check_compatible(unet, conditioner)
    use_fast_temporal_convs(unet), use_fast_temporal_convs(conditioner)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return DiffusionComponents(unet, conditioner)
