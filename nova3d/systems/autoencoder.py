"""The toy VAE's LightningModule: reconstruct every domain video (RGB and normals) of an object.

A step: the batch's RGB (2x-1) and normal videos, [D*B, V, 3, H, W] in [-1, 1] as the diffusion
system feeds them to its frozen VAE (DOMAIN_VIDEOS) -> per-image posterior -> a draw -> the
temporal decoder over each video's V frames -> L1 reconstruction + kl_weight * KL. Validation:
the L1 of the posterior mode (deterministic) and a TensorBoard sheet (input | reconstruction).
"""
from __future__ import annotations

import dataclasses

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from nova3d.data.views import MultiViewBatch
from nova3d.models.autoencoder import AutoencoderExperimentConfig, build_vae
from nova3d.models.conditioning import decode_frames
from nova3d.models.gta import stack_domains
from nova3d.systems.mv_diffusion import DOMAIN_VIDEOS, LinearWarmup
from nova3d.viz import to_uint8

DOMAINS = ("rgb", "normal")


def domain_videos(batch: MultiViewBatch) -> Tensor:
    """[D*B, V, 3, H, W] in [-1, 1]: what the diffusion system encodes with its frozen VAE."""
    return stack_domains([DOMAIN_VIDEOS[d](batch) for d in DOMAINS])


def orbit_window(videos: Tensor, frames: int | None) -> Tensor:
    """[N, V, ...] -> [N, frames, ...]: consecutive views from a random start, wrapping around the orbit."""
    v = videos.shape[1]
    if frames is None or frames >= v:
        return videos
    start = int(torch.randint(v, ()))
    return videos[:, (torch.arange(frames) + start) % v]


class AutoencoderSystem(L.LightningModule):
    def __init__(self, cfg: AutoencoderExperimentConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = build_vae(cfg.model, cfg.data.resolution)
        self.save_hyperparameters({"config": dataclasses.asdict(cfg)})

    def reconstruct(self, videos: Tensor, sample: bool, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor]:
        """videos [N, V, 3, H, W] -> (reconstruction of the same shape, KL per image [N*V])."""
        n, v = videos.shape[:2]
        posterior = self.vae.encode(videos.flatten(0, 1)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        recon = decode_frames(self.vae, z, v)
        return recon.unflatten(0, (n, v)), posterior.kl()

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        videos = orbit_window(domain_videos(batch), self.cfg.optim.frames_per_video)
        recon, kl = self.reconstruct(videos, sample=True)
        l1, kl = F.l1_loss(recon, videos), kl.mean()
        loss = l1 + self.cfg.optim.kl_weight * kl
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log_dict({"train/l1": l1, "train/kl": kl}, batch_size=len(batch))
        return loss

    def validation_step(self, batch: MultiViewBatch, batch_idx: int) -> None:
        videos = domain_videos(batch)
        recon, _ = self.reconstruct(videos, sample=False)
        self.log("val/loss", F.l1_loss(recon, videos), prog_bar=True, batch_size=len(batch), sync_dist=True)
        tensorboard = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if batch_idx == 0 and tensorboard is not None and self.trainer.is_global_zero:
            rows = [torch.cat(list(x), dim=-1) for x in (videos[0], recon[0], videos[len(batch)], recon[len(batch)])]
            sheet = to_uint8(((torch.cat(rows, dim=-2) + 1) / 2).clamp(0, 1))
            tensorboard.experiment.add_image("val/reconstruction", np.asarray(sheet), self.global_step,
                                             dataformats="HWC")

    def configure_optimizers(self) -> dict:
        o = self.cfg.optim
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=o.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(o.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
