"""The multi-view diffusion LightningModule: GTA-SVD denoising RGB and normal videos jointly.

Wiring only (DESIGN.md §3.4): the UNet and the frozen Conditioner come from
nova3d.models.factory, the loss from nova3d.losses.diffusion, EDM maths from nova3d.models.edm.

A training step: input image -> ImageCondition (CLIP embedding + noise-augmented latent + time
ids, dropped per object for CFG) -> every domain video (RGB as 2x-1, normals as they are, both
in [-1, 1]) -> VAE latents, stacked domain-major [D*B, V, 4, h, w] -> one σ per object, shared
by its domains -> GTA-UNet (v-prediction, EDM preconditioning) -> EDM loss per domain, weighted.
Checkpoints hold the UNet (and EMA) only: the frozen Conditioner is rebuilt from the config.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn

from nova3d.config import ExperimentConfig
from nova3d.data.latent_cache import check_vae
from nova3d.data.schema import LATENT_DOMAINS
from nova3d.data.views import MultiViewBatch
from nova3d.errors import Nova3DError
from nova3d.losses.diffusion import DomainLosses, multi_domain_edm_loss, weighted_total
from nova3d.models.denoiser import ImageCondition, encode_image_condition, unet_forward
from nova3d.models.edm import (add_noise, denoise, guidance_schedule, karras_sigmas, sample,
                               sample_condition_dropout, sample_training_sigmas)
from nova3d.models.ema import ParameterEMA
from nova3d.models.factory import DiffusionComponents, build_components, check_domains
from nova3d.models.gta import split_domains, split_parameters, stack_domains
from nova3d.models.unet import WEIGHTS_NAME, load_gta_weights
from nova3d.viz import contact_sheet

# Each domain's video in [-1, 1], [B, V, 3, H, W]: the model sees normals as a second video.
DOMAIN_VIDEOS: dict[str, Callable[[MultiViewBatch], Tensor]] = {
    "rgb": lambda batch: batch.rgb * 2 - 1,
    "normal": lambda batch: batch.normals,
}
CONDITIONER_PREFIX = "conditioner."
VAE_CHUNK = 16  # images per VAE encoder call: bounds activation memory at 512²
GUIDANCE_KINDS = ("constant", "linear", "triangle")


@dataclass
class LinearWarmup:
    """LR multiplier: linear from 1/steps to 1 over `steps` optimizer steps; then 1, or, with
    `decay_steps` > steps, a cosine from 1 down to `final_ratio` at step `decay_steps` (held after).

    A callable object rather than a lambda so LambdaLR saves it as a plain dict (weights_only loads).
    """

    steps: int
    decay_steps: int = 0
    final_ratio: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.steps:
            return (step + 1) / self.steps
        if self.decay_steps <= self.steps:
            return 1.0
        progress = min(1.0, (step - self.steps) / (self.decay_steps - self.steps))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


LR_SCHEDULES = ("constant", "cosine")
DIFFUSION_TARGETS = ("sample", "mode")


def experiment_from_dict(data: dict) -> ExperimentConfig:
    """The ExperimentConfig a checkpoint's hyper_parameters["config"] describes (schema-checked)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), data))


class MultiViewDiffusion(L.LightningModule):
    def __init__(self, cfg: ExperimentConfig, components: Optional[DiffusionComponents] = None):
        super().__init__()
        s = cfg.system
        check_domains(cfg.model.domains)
        missing = [d for d in cfg.model.domains if d not in s.loss_weights]
        if missing:
            raise Nova3DError(f"system.loss_weights has no weight for domain(s) {missing}")
        if s.val_guidance_schedule not in GUIDANCE_KINDS or len(s.val_guidance) != 2:
            raise Nova3DError(f"system.val_guidance must be [min, max] and val_guidance_schedule one of "
                              f"{GUIDANCE_KINDS}, got {s.val_guidance} / {s.val_guidance_schedule!r}")
        if s.lr_schedule not in LR_SCHEDULES or not 0 <= s.lr_final_ratio <= 1:
            raise Nova3DError(f"system.lr_schedule must be one of {LR_SCHEDULES} and system.lr_final_ratio in [0, 1], "
                              f"got {s.lr_schedule!r} / {s.lr_final_ratio}")
        if s.diffusion_target not in DIFFUSION_TARGETS:
            raise Nova3DError(f"system.diffusion_target must be one of {DIFFUSION_TARGETS}, got {s.diffusion_target!r}")
        self.cfg = cfg
        self.domains: tuple[str, ...] = tuple(cfg.model.domains)
        self.loss_weights: list[float] = [float(s.loss_weights[d]) for d in self.domains]
        components = components or build_components(cfg.model, seed=cfg.seed)
        self.unet = components.unet
        self.conditioner = components.conditioner
        self.ema: Optional[ParameterEMA] = ParameterEMA(s.ema_decay) if s.ema_decay else None
        self._ema_scope = ExitStack()  # holds EMA weights in place during validation/test
        self._rng: Optional[torch.Generator] = None  # training noise, created on the right device
        self._sheets_logged = 0  # contact sheets logged in the current validation
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({"config": dataclasses.asdict(cfg)})

    @classmethod
    def load_trained(cls, ckpt_path: str, use_ema: bool = True, map_location: str = "cpu") -> "MultiViewDiffusion":
        """A trained system from a training checkpoint (EMA weights when saved and `use_ema`), in eval mode."""
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
        return cls.from_checkpoint(ckpt, use_ema)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, use_ema: bool = True) -> "MultiViewDiffusion":
        """`load_trained` on an already loaded checkpoint dict (its state_dict gets the conditioner keys)."""
        system = cls(experiment_from_dict(ckpt["hyper_parameters"]["config"]))
        system.on_load_checkpoint(ckpt)
        system.load_state_dict(ckpt["state_dict"])
        if use_ema and system.ema is not None:
            system.ema.copy_to(system.trainable_parameters())
        return system.eval()

    def init_unet_from(self, folder: str | Path) -> None:
        """Start from the UNet of an exported pipeline folder (model.init_from), strictly: same
        architecture and GTA layout. EMA (when on) starts from these weights too."""
        weights = Path(folder) / "unet" / WEIGHTS_NAME
        if not weights.is_file():
            raise Nova3DError(f"model.init_from: {weights} not found (expected an exported pipeline folder, "
                              "`nova3d export`)")
        try:
            load_gta_weights(self.unet, weights, strict=True)
        except (ValueError, RuntimeError, OSError) as err:  # GTA layout, shapes or a damaged file
            reason = str(err).strip().splitlines()[0]
            raise Nova3DError(f"model.init_from: {weights} does not fit this experiment's UNet: {reason}") from err

    # ------------------------------------------------------------ parameters and optimiser

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The UNet's parameters (the Conditioner is frozen and never optimised)."""
        return ((n, p) for n, p in self.unet.named_parameters() if p.requires_grad)

    def configure_optimizers(self) -> dict:
        s = self.cfg.system
        pretrained, new = split_parameters(self.unet)
        groups = [{"name": "pretrained", "params": [p for p in pretrained if p.requires_grad], "lr": s.lr},
                  {"name": "new", "params": [p for p in new if p.requires_grad], "lr": s.lr_new}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, weight_decay=s.weight_decay)
        decay = self.cfg.trainer.max_steps if s.lr_schedule == "cosine" else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(s.warmup_steps, decay, s.lr_final_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ the diffusion loss

    def encode_condition(self, batch: MultiViewBatch, generator: Optional[torch.Generator]) -> ImageCondition:
        # The frozen conditioner runs with autocast off, in float32 (nova3d.models.conditioning), so the
        # condition is the one a float32 Nova3DPipeline computes for sampling (tests/test_precision.py).
        s = self.cfg.system
        return encode_image_condition(self.conditioner, batch.input_image * 2 - 1,
                                      noise_aug_strength=s.noise_aug_strength, fps=s.fps,
                                      motion_bucket_id=s.motion_bucket_id, generator=generator)

    def target_latents(self, batch: MultiViewBatch, sample_posterior: bool,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """[D*B, V, 4, h, w] scaled VAE latents of every domain video, domain-major.

        From the batch's cached posterior when it has one (nova3d.data.latent_cache): the same chunks
        and the same draws from `generator` as encoding, so the two agree up to the cache's float16."""
        if batch.latent_params is not None:
            params = stack_domains([batch.latent_params[:, LATENT_DOMAINS.index(d)] for d in self.domains])
            return posterior_latents(params, sample_posterior, generator, VAE_CHUNK) * self.conditioner.scaling_factor
        videos = stack_domains([DOMAIN_VIDEOS[d](batch) for d in self.domains])
        latents = self.conditioner.encode_frames(videos, sample=sample_posterior, generator=generator,
                                                 chunk_size=VAE_CHUNK)
        return latents.float()  # float32 targets: the conditioner encodes with autocast off

    def diffusion_loss(self, latents: Tensor, noise: Tensor, sigma: Tensor, cond: ImageCondition) -> DomainLosses:
        """latents, noise: [D*B, V, 4, h, w]; sigma: [B], one per object and shared by its domains."""
        num_domains = len(self.domains)
        rows = sigma.repeat(num_domains)  # [D*B], domain-major like the latents
        noisy = add_noise(latents, noise, rows)
        denoised = denoise(partial(unet_forward, self.unet, cond=cond, num_domains=num_domains), noisy, rows)
        return multi_domain_edm_loss(denoised, latents, rows, self.loss_weights)

    def compute_losses(self, batch: MultiViewBatch, generator: torch.Generator) -> tuple[DomainLosses, Tensor]:
        """The training loss of a batch with every random draw from `generator`; also returns σ [B]."""
        s, b = self.cfg.system, len(batch)
        drop = sample_condition_dropout(b, p_both=s.cond_dropout, generator=generator, device=self.device)
        cond = self.encode_condition(batch, generator).dropped(drop)
        latents = self.target_latents(batch, sample_posterior=s.diffusion_target == "sample", generator=generator)
        sigma = sample_training_sigmas(b, s.p_mean, s.p_std, generator=generator, device=self.device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
        return self.diffusion_loss(latents, noise.to(latents.device), sigma, cond), sigma

    # ------------------------------------------------------------ training

    def _train_generator(self) -> torch.Generator:
        # Seeded by rank (ranks draw different noise) and by the step training starts from
        # (a resumed run does not replay the noise of its first steps).
        if self._rng is None:
            seed = np.random.SeedSequence([self.cfg.seed, self.global_rank, self.global_step]).generate_state(1)[0]
            self._rng = torch.Generator(device=self.device).manual_seed(int(seed))
        return self._rng

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        losses, sigma = self.compute_losses(batch, self._train_generator())
        b = len(batch)
        self._log_losses("train", losses, b)
        self.log_dict({"train/sigma_mean": sigma.mean(), "train/log_sigma_mean": sigma.log().mean()}, batch_size=b)
        return losses.total

    def _log_losses(self, stage: str, losses: DomainLosses, batch_size: int) -> None:
        train = stage == "train"
        self.log(f"{stage}/loss", losses.total, prog_bar=True, batch_size=batch_size, sync_dist=not train)
        metrics = {f"{stage}/loss_{d}": losses.per_domain[i] for i, d in enumerate(self.domains)}
        if train:
            metrics.update({f"train/weight_{d}": losses.weights[i] for i, d in enumerate(self.domains)})
        self.log_dict(metrics, batch_size=batch_size, sync_dist=not train)

    def on_fit_start(self) -> None:
        d = self.cfg.data
        if d.use_cached_latents:  # latents of another VAE would silently train on wrong targets
            check_vae([s for s in (d.train_shards, d.val_shards) if s], self.conditioner.vae)

    def optimizer_step(self, *args, **kwargs) -> None:
        # Called once per optimizer step (not per accumulated batch), before checkpoint callbacks run.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.trainable_parameters())

    # ------------------------------------------------------------ validation and test

    def validation_step(self, batch: MultiViewBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: MultiViewBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: MultiViewBatch, stage: str) -> None:
        """Deterministic loss at the fixed σ of system.val_sigmas, and sample sheets of the first objects."""
        s, b = self.cfg.system, len(batch)
        # Seeded by the objects, so every evaluation of an object draws the same noise, on any device.
        gen = torch.Generator().manual_seed(zlib.crc32(",".join(batch.object_ids).encode()) ^ self.cfg.seed)
        cond = self.encode_condition(batch, gen)
        latents = self.target_latents(batch, sample_posterior=False)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        per_sigma = [self.diffusion_loss(latents, noise, torch.full((b,), v, device=self.device), cond).per_domain
                     for v in s.val_sigmas]
        self._log_losses(stage, weighted_total(torch.stack(per_sigma).mean(dim=0), self.loss_weights), b)
        self._log_sample_sheets(batch, cond, stage, gen)

    @torch.no_grad()
    def sample_views(self, cond: ImageCondition, num_views: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """EDM Euler sampling with per-frame guidance (system.val_*), decoded: [D, n, V, 3, H, W] in about [-1, 1]."""
        s, num_domains = self.cfg.system, len(self.domains)
        n, channels, h, w = cond.latent.shape
        uncond = cond.unconditional()

        def denoiser_fn(x: Tensor, sigma: Tensor, use_cond: bool) -> Tensor:
            model_fn = partial(unet_forward, self.unet, cond=cond if use_cond else uncond, num_domains=num_domains)
            return denoise(model_fn, x, sigma)

        guidance = guidance_schedule(s.val_guidance_schedule, num_views, *s.val_guidance)
        latents = sample(denoiser_fn, (num_domains * n, num_views, channels, h, w), karras_sigmas(s.val_sampling_steps),
                         guidance, generator=generator, device=self.device)
        chunk = s.val_decode_chunk_size
        if chunk is not None and chunk < 1:
            raise Nova3DError(f"system.val_decode_chunk_size must be >= 1 or null, got {chunk}")
        return split_domains(self.conditioner.decode_latents(latents, chunk), num_domains)

    def _log_sample_sheets(self, batch: MultiViewBatch, cond: ImageCondition, stage: str,
                           generator: torch.Generator) -> None:
        tensorboard = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        count = min(len(batch), self.cfg.system.val_num_objects - self._sheets_logged)
        if tensorboard is None or count <= 0 or not self.trainer.is_global_zero:
            return
        views = self.sample_views(cond.select(slice(0, count)), batch.rgb.shape[1], generator)  # [D, n, V, 3, H, W]
        for i in range(count):
            generated = self._domain_views(lambda d: views[d][i])
            target = self._domain_views(lambda d: DOMAIN_VIDEOS[self.domains[d]](batch)[i])
            num_views = generated[0].shape[0]
            sheets = [contact_sheet(batch.input_image[i], *generated, labels=[f"sample {v}" for v in range(num_views)]),
                      contact_sheet(batch.input_image[i], *target, labels=[f"target {v}" for v in range(num_views)])]
            tensorboard.experiment.add_image(f"{stage}_samples/{batch.object_ids[i]}", np.asarray(_stack(sheets)),
                                             self.global_step, dataformats="HWC")
        self._sheets_logged += count

    def _domain_views(self, video: Callable[[int], Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(rgb in [0, 1], normals in [-1, 1] or None) from `video(d)` -> [V, 3, H, W] in [-1, 1]."""
        rgb = ((video(0).float() + 1) / 2).clamp(0, 1)
        normals = video(self.domains.index("normal")).float().clamp(-1, 1) if "normal" in self.domains else None
        return rgb, normals

    def on_validation_epoch_start(self) -> None:
        self._begin_eval()

    def on_validation_epoch_end(self) -> None:
        self._ema_scope.close()

    def on_test_epoch_start(self) -> None:
        self._begin_eval()

    def on_test_epoch_end(self) -> None:
        self._ema_scope.close()

    def _begin_eval(self) -> None:
        self._sheets_logged = 0
        if self.ema is not None:  # evaluate (and sample) with the averaged weights
            self._ema_scope.enter_context(self.ema.applied(self.trainable_parameters()))

    # ------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen conditioner is rebuilt from the config: checkpoints hold what training changes.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(CONDITIONER_PREFIX)]:
            del state[key]
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Put the config-built conditioner weights back, so the UNet still loads strictly.
        state = checkpoint["state_dict"]
        for key, value in self.conditioner.state_dict(prefix=CONDITIONER_PREFIX).items():
            state.setdefault(key, value)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])


def posterior_latents(params: Tensor, sample: bool, generator: Optional[torch.Generator], chunk_size: int) -> Tensor:
    """Cached posterior [N, F, 2*C, h, w] (mean, logvar) -> unscaled latents [N, F, C, h, w] float32,
    drawn chunk by chunk exactly as Conditioner.encode_frames draws from the encoder's posterior."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    flat = params.float().flatten(0, 1)
    out = []
    for i in range(0, flat.shape[0], chunk_size):
        dist = DiagonalGaussianDistribution(flat[i : i + chunk_size])
        out.append(dist.sample(generator) if sample else dist.mode())
    return torch.cat(out).unflatten(0, params.shape[:2])


def _stack(images: list[Image.Image]) -> Image.Image:
    """Images one above the other on white."""
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out
