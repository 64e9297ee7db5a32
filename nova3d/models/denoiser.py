"""How the GTA-UNet is called: SVD's image condition and the domain-major forward pass.

Every domain video of an object gets the same condition (DESIGN.md §4): the CLIP embedding of
the input image (cross-attention), its noise-augmented VAE latent concatenated to every frame
(8 input channels), and the added time ids [fps - 1, motion_bucket_id, noise_aug_strength]
exactly as StableVideoDiffusionPipeline builds them (`_get_add_time_ids` after `fps = fps - 1`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from nova3d.models.conditioning import Conditioner
from nova3d.models.edm import ConditionDropout, apply_condition_dropout
from nova3d.models.gta import stack_domains


@dataclass
class ImageCondition:
    """The per-object condition of a batch of B objects (shared by all their domains)."""

    clip_embeds: Tensor  # [B, 1, E] CLIP image embedding
    latent: Tensor  # [B, 4, h, w] noise-augmented, unscaled VAE latent of the input image
    added_time_ids: Tensor  # [B, 3] fps - 1, motion bucket id, noise augmentation strength

    def dropped(self, masks: ConditionDropout) -> "ImageCondition":
        """Zero the embedding and/or latent where `masks` says (classifier-free guidance training)."""
        clip, latent = apply_condition_dropout(self.clip_embeds, self.latent, masks)
        return dataclasses.replace(self, clip_embeds=clip, latent=latent)

    def unconditional(self) -> "ImageCondition":
        """What SVD's pipeline feeds the unconditional branch: zero embedding and latent, same time ids."""
        return dataclasses.replace(self, clip_embeds=torch.zeros_like(self.clip_embeds),
                                   latent=torch.zeros_like(self.latent))

    def select(self, index: slice) -> "ImageCondition":
        """The condition of some objects (a slice of the batch axis)."""
        return ImageCondition(self.clip_embeds[index], self.latent[index], self.added_time_ids[index])


def svd_added_time_ids(fps: int, motion_bucket_id: int, noise_aug_strength: float, batch_size: int,
                       device: torch.device | str | None = None) -> Tensor:
    """[batch_size, 3] float32 ids as the SVD pipeline computes them for its `fps` argument."""
    ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=torch.float32, device=device)
    return ids.repeat(batch_size, 1)


def encode_image_condition(conditioner: Conditioner, images: Tensor, *, noise_aug_strength: float, fps: int,
                           motion_bucket_id: int, generator: Optional[torch.Generator] = None) -> ImageCondition:
    """images [B, 3, H, W] in [-1, 1] -> ImageCondition (no grad; the conditioner is frozen)."""
    clip = conditioner.encode_image_clip(images)
    latent = conditioner.encode_condition_latent(images, noise_aug_strength, generator)
    ids = svd_added_time_ids(fps, motion_bucket_id, noise_aug_strength, images.shape[0], images.device)
    return ImageCondition(clip, latent, ids)


def unet_forward(unet: nn.Module, x_in: Tensor, c_noise: Tensor, cond: ImageCondition, num_domains: int) -> Tensor:
    """The EDM `model_fn` of a GTA-UNet.

    x_in: [D*B, F, 4, h, w] preconditioned noisy latents, domain-major; c_noise: [D*B];
    cond: B objects, repeated here for every domain. Returns the v-prediction [D*B, F, 4, h, w].
    """
    frames = x_in.shape[1]

    def rows(t: Tensor) -> Tensor:  # [B, ...] -> [D*B, ...] in the domain-major order
        return stack_domains([t] * num_domains)

    latent = rows(cond.latent).unsqueeze(1).expand(-1, frames, -1, -1, -1).to(x_in.dtype)
    sample = torch.cat([x_in, latent], dim=2)  # noisy latents first, as the pipeline concatenates
    return unet(sample, c_noise, encoder_hidden_states=rows(cond.clip_embeds),
                added_time_ids=rows(cond.added_time_ids), return_dict=False)[0]
