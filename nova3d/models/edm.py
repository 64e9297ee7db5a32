"""EDM as Stable Video Diffusion uses it: v-prediction preconditioning, training noise, Euler sampler.

Conventions (σ_data = 1, the "VE" variable x = x0 + σ·n that diffusers' EulerDiscreteScheduler uses):

* ``precondition(σ)``: c_in = 1/√(σ²+1), c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), c_noise = ¼·ln σ.
  The UNet sees ``c_in·x`` and timestep ``c_noise``; its output F is a v-prediction and
  ``denoised = c_skip·x + c_out·F`` (EulerDiscreteScheduler.step with v_prediction, SVD's pipeline).
* Video tensors are ``[B, F, C, h, w]`` (frame axis 1, as the SVD UNet takes them); σ is one value
  per sample, ``[B]``, broadcast over every other axis. RGB and normal videos of one object are
  separate samples on the batch axis: give them the same σ (repeat it in the system's stacking order).
* Everything is model-agnostic: callers wrap their UNet into ``model_fn`` / ``denoiser_fn``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

GuidanceKind = Literal["constant", "linear", "triangle"]


def svd_xt_scheduler_config() -> dict:
    """`scheduler/scheduler_config.json` of stabilityai/stable-video-diffusion-img2vid-xt, written out.

    Our sampler reproduces EulerDiscreteScheduler built from this (tests/test_edm.py checks it).
    Only prediction_type, use_karras_sigmas, sigma_min/max, timestep_type and timestep_spacing
    (which makes init_noise_sigma = √(σ_max²+1)) matter for the EDM path; the betas are unused.
    """
    return {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "sigma_max": 700.0,
        "sigma_min": 0.002,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "timestep_type": "continuous",
        "trained_betas": None,
        "use_karras_sigmas": True,
    }


# ---------------------------------------------------------------- preconditioning


@dataclass(frozen=True)
class Preconditioning:
    """EDM coefficients, each shaped like the σ they were computed from."""

    c_in: Tensor
    c_skip: Tensor
    c_out: Tensor
    c_noise: Tensor


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims, for broadcasting per-sample values."""
    if x.ndim > ndim:
        raise ValueError(f"tensor has {x.ndim} dims, more than the target {ndim}")
    return x[(...,) + (None,) * (ndim - x.ndim)]


def precondition(sigma: Tensor) -> Preconditioning:
    """EDM v-prediction coefficients with σ_data = 1. sigma: any shape (usually [B]) -> same shape each."""
    sigma = torch.as_tensor(sigma)
    var = sigma**2 + 1
    return Preconditioning(
        c_in=var.rsqrt(),
        c_skip=1 / var,
        c_out=-sigma * var.rsqrt(),
        c_noise=0.25 * sigma.log(),
    )


def denoise(model_fn: Callable[..., Tensor], x_noisy: Tensor, sigma: Tensor, **cond) -> Tensor:
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise).

    x_noisy: [B, ...]; sigma: [B] (or a scalar, shared); model_fn(x_in [B, ...], c_noise [B], **cond)
    returns F shaped like x_noisy. Concatenating the condition latent is model_fn's business.
    """
    sigma = torch.as_tensor(sigma, device=x_noisy.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x_noisy.shape[0])
    p = precondition(sigma)
    c_in, c_skip, c_out = (append_dims(c, x_noisy.ndim) for c in (p.c_in, p.c_skip, p.c_out))
    out = model_fn((c_in * x_noisy).to(x_noisy.dtype), p.c_noise, **cond)
    # The combination is done in float32, as the scheduler upcasts `sample` in step().
    return c_skip * x_noisy.float() + c_out * out.float()


def v_target(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The F for which denoise() returns x0 exactly: (n − σ·x0)/√(σ²+1) (= diffusers' get_velocity)."""
    s = append_dims(torch.as_tensor(sigma, device=x0.device, dtype=x0.dtype), x0.ndim)
    return (noise - s * x0) * (s**2 + 1).rsqrt()


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x = x0 + σ·n. x0, noise: [B, ...]; sigma: [B]."""
    return x0 + append_dims(sigma.to(x0.dtype), x0.ndim) * noise


# ---------------------------------------------------------------- training


def sample_training_sigmas(
    batch_size: int,
    p_mean: float = 0.7,
    p_std: float = 1.6,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """log σ ~ N(p_mean, p_std), one σ per object: [batch_size] float32.

    Defaults are those of the public SVD fine-tuning scripts. The generator decides the device
    the numbers are drawn on (CPU generator -> drawn on CPU, then moved), so runs reproduce.
    """
    gen_device = generator.device if generator is not None else device
    log_sigma = torch.randn(batch_size, generator=generator, device=gen_device) * p_std + p_mean
    return log_sigma.exp().to(device) if device is not None else log_sigma.exp()


def loss_weight(sigma: Tensor, sigma_data: float = 1.0) -> Tensor:
    """EDM λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; (σ²+1)/σ² for SVD's σ_d = 1. Shape of sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(
    denoised: Tensor,
    target: Tensor,
    sigma: Tensor,
    reduction: Literal["none", "mean"] = "none",
    sigma_data: float = 1.0,
) -> Tensor:
    """λ(σ)·mean((D − x0)²) over all non-batch axes.

    denoised, target: [B, ...]; sigma: [B]. Returns [B] (reduction "none": the system weights
    and logs per domain) or a scalar ("mean"). Computed in float32.
    """
    err = (denoised.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    loss = loss_weight(sigma.float(), sigma_data) * err
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    # Draw on the generator's device, like diffusers' randn_tensor, so CPU seeds reproduce on GPU.
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def noise_augment(images: Tensor, strength: float | Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """SVD's condition noise augmentation: image + strength·ε, in pixel space before the VAE.

    images: [B, 3, H, W] in [-1, 1]; strength: a float or [B] (per-sample strengths). The same
    strength must go into the UNet's added time ids.
    """
    strength = torch.as_tensor(strength, device=images.device, dtype=images.dtype)
    if strength.ndim == 1:
        strength = append_dims(strength, images.ndim)
    return images + strength * _randn_like(images, generator)


@dataclass(frozen=True)
class ConditionDropout:
    """Per-sample keep masks, [B] bool each: False zeroes that condition (classifier-free guidance)."""

    keep_clip: Tensor
    keep_latent: Tensor


def sample_condition_dropout(
    batch_size: int,
    p_both: float = 0.1,
    p_clip_only: float = 0.0,
    p_latent_only: float = 0.0,
    generator: Optional[torch.Generator] = None,
    device: torch.device | str | None = None,
) -> ConditionDropout:
    """Draw which samples lose their CLIP embedding and/or their image latent.

    One uniform u per sample splits [0, 1) into disjoint events (as InstructPix2Pix / the SVD
    fine-tuning scripts do): u < p_both drops both (the unconditional branch sampling uses),
    then p_clip_only, then p_latent_only. Draw per object and repeat for its domains.
    """
    if p_both + p_clip_only + p_latent_only > 1:
        raise ValueError("condition dropout probabilities sum to more than 1")
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch_size, generator=generator, device=gen_device).to(device)
    drop_both = u < p_both
    drop_clip = drop_both | ((u >= p_both) & (u < p_both + p_clip_only))
    lo = p_both + p_clip_only
    drop_latent = drop_both | ((u >= lo) & (u < lo + p_latent_only))
    return ConditionDropout(keep_clip=~drop_clip, keep_latent=~drop_latent)


def apply_condition_dropout(
    clip_embeds: Tensor, cond_latents: Tensor, masks: ConditionDropout
) -> tuple[Tensor, Tensor]:
    """Zero dropped conditions. clip_embeds: [B, 1, D]; cond_latents: [B, 4, h, w] or [B, F, 4, h, w].

    Zeros are exactly what SVD's pipeline feeds the unconditional branch.
    """
    keep_c = append_dims(masks.keep_clip.to(clip_embeds.device, clip_embeds.dtype), clip_embeds.ndim)
    keep_l = append_dims(masks.keep_latent.to(cond_latents.device, cond_latents.dtype), cond_latents.ndim)
    return clip_embeds * keep_c, cond_latents * keep_l


# ---------------------------------------------------------------- sampling


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0
) -> Tensor:
    """SVD's sampling schedule: num_steps Karras σ from σ_max down to σ_min, then a final 0.

    Returns [num_steps + 1] float32, computed in float64 like the scheduler's numpy code.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def guidance_schedule(
    kind: GuidanceKind, num_frames: int, min_scale: float = 1.0, max_scale: float = 3.0
) -> Tensor:
    """Per-frame classifier-free guidance scales, [num_frames] float32.

    constant: max_scale everywhere. linear: min -> max over frames (SVD's pipeline).
    triangle: SV3D's TrianglePredictionGuider (period 1): min at the first and last frame, max
    at the middle of the orbit; for an even frame count the peak falls between two frames.
    """
    if kind == "constant":
        return torch.full((num_frames,), float(max_scale))
    if kind == "linear":
        return torch.linspace(min_scale, max_scale, num_frames)
    if kind == "triangle":
        v = torch.linspace(0, 1, num_frames)
        wave = 2 * (v - torch.floor(v + 0.5)).abs()
        return wave * (max_scale - min_scale) + min_scale
    raise ValueError(f"unknown guidance schedule {kind!r}; choose constant, linear or triangle")


def euler_step(x: Tensor, denoised: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One deterministic Euler step of the probability-flow ODE dx/dσ = (x − D)/σ."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def _guidance_dims(guidance: Tensor | float, x: Tensor) -> Tensor:
    g = torch.as_tensor(guidance, device=x.device, dtype=torch.float32)
    if g.ndim == 1:  # [F] -> [1, F, 1, 1, 1]: frames are axis 1
        g = g.view(1, -1, *([1] * (x.ndim - 2)))
    return g


DenoiserFn = Callable[[Tensor, Tensor, bool], Tensor]


@torch.no_grad()
def sample(
    denoiser_fn: DenoiserFn,
    shape: tuple[int, ...],
    sigmas: Tensor,
    guidance: Tensor | float = 1.0,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    x_init: Optional[Tensor] = None,
) -> Tensor:
    """Euler (EDM) sampling with per-frame classifier-free guidance, as SVD's pipeline does it.

    denoiser_fn(x [B, F, C, h, w], sigma [B], cond: bool) -> denoised [B, F, C, h, w]; cond=False
    must run the unconditional branch (zeroed CLIP embedding and image latent). sigmas: [N + 1]
    ending in 0 (karras_sigmas). guidance: a float or [F]; the unconditional pass is skipped
    when every scale is <= 1 (the pipeline's rule). Guiding the denoised estimate equals the
    pipeline's guiding of the v-output, since both are affine in it with the same c_skip·x.
    Start: x = ε·√(σ_0²+1), the scheduler's init_noise_sigma (SVD/sgm scale the noise this way
    too), unless x_init (already scaled) is given. progress(step, num_steps) after each step.
    Returns the final x0 estimate in float32.
    """
    sigmas = sigmas.float().cpu()
    if x_init is not None:
        x = x_init.float()
    else:
        gen_device = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device).float()
        x = x * math.sqrt(float(sigmas[0]) ** 2 + 1)
    g = _guidance_dims(guidance, x)
    do_cfg = bool((g > 1).any())
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        sigma_b = torch.full((x.shape[0],), s, device=x.device)
        x_in = x.to(dtype)
        d = denoiser_fn(x_in, sigma_b, True).float()
        if do_cfg:
            d_u = denoiser_fn(x_in, sigma_b, False).float()
            d = d_u + g * (d - d_u)
        x = euler_step(x, d, s, s_next)
        if progress is not None:
            progress(i + 1, num_steps)
    return x
