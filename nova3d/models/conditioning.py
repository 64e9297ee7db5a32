"""The frozen image conditioners of SVD: CLIP image embedding and the temporal-decoder VAE.

Loaded from an SVD diffusers folder (or hub id) laid out as the official repo:
``image_encoder/`` (CLIPVisionModelWithProjection), ``vae/`` (AutoencoderKLTemporalDecoder),
``feature_extractor/`` (CLIPImageProcessor, optional: only its mean/std are used).

Conventions, all as StableVideoDiffusionPipeline does them:

* Images are float tensors ``[B, 3, H, W]`` in [-1, 1]; videos ``[B, F, 3, H, W]``; latents
  ``[B, F, 4, H/8, W/8]`` (H/2 for the tiny test VAE).
* The *condition latent* (concatenated to every frame) is ``encode(image + s·ε).mode()`` and is
  **not** multiplied by the scaling factor; *target latents* (what the UNet denoises) are
  multiplied by ``vae.config.scaling_factor`` (0.18215), and decode_latents divides it back out.
* CLIP input: [-1, 1] -> antialiased bicubic resize to the encoder's size (224) -> [0, 1] ->
  CLIP mean/std. Tensor in, tensor out, so it runs on the GPU inside a training step.

Precision (issue 14): every encode/decode runs with autocast **off**, in the dtype of the loaded
weights, so a training step under Lightning's ``bf16-mixed`` sees exactly the float32 condition
and targets that sampling from a float32 pipeline computes (tests/test_precision.py). A float16
VAE whose config says ``force_upcast`` (SVD's) is upcast to float32 to *encode*, and decodes in
float16, as StableVideoDiffusionPipeline does; CLIP runs in its own dtype (float16 in an fp16
pipeline, as SVD's). A bfloat16 VAE is used as it is (bfloat16 has float32's range).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    _resize_with_antialiasing,  # private, but diffusers is pinned and bit-parity is the point (tested)
)
from torch import Tensor, nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from nova3d.errors import Nova3DError
from nova3d.models.edm import noise_augment

IMAGE_ENCODER_DIR, VAE_DIR, FEATURE_EXTRACTOR_DIR = "image_encoder", "vae", "feature_extractor"
# The VAE classes a conditioner folder may hold (vae/config.json's _class_name): SVD's temporal-decoder
# VAE, and the per-image AutoencoderKL the toy recipe trains (nova3d.models.autoencoder says why).
VAE_CLASSES = {cls.__name__: cls for cls in (AutoencoderKLTemporalDecoder, AutoencoderKL)}
# transformers' OPENAI_CLIP_MEAN / _STD: used when a folder has no feature_extractor/.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FP16_MAX = 65504.0


class Conditioner(nn.Module):
    """Frozen CLIP image encoder + SVD VAE with batch-friendly, no-grad encode/decode.

    An nn.Module so that Lightning moves it with the system; it stays in eval mode whatever
    .train() is called with, and none of its parameters require grad.
    """

    def __init__(
        self,
        image_encoder: CLIPVisionModelWithProjection,
        vae: AutoencoderKLTemporalDecoder | AutoencoderKL,
        feature_extractor: Optional[CLIPImageProcessor] = None,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.vae = vae
        mean = feature_extractor.image_mean if feature_extractor is not None else CLIP_MEAN
        std = feature_extractor.image_std if feature_extractor is not None else CLIP_STD
        # Non-persistent: derived from the loaded folder, not part of a checkpoint.
        self.register_buffer("clip_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        size = image_encoder.config.image_size
        self.clip_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Conditioner":
        return super().train(False)  # frozen: dropout/norm layers never switch to training

    @property
    def embed_dim(self) -> int:
        return self.image_encoder.config.projection_dim

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SVD), computed as the pipeline does."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    def _vae_in(self, x: Tensor) -> Tensor:
        return x.to(device=self.vae.device, dtype=self.vae.dtype)

    @property
    def vae_needs_upcast(self) -> bool:
        """True for a float16 VAE with force_upcast in its config (SVD's): it encodes in float32."""
        return self.vae.dtype == torch.float16 and bool(self.vae.config.get("force_upcast", False))

    @contextlib.contextmanager
    def _encoding(self) -> Iterator[None]:
        """Autocast off (the frozen conditioner computes in its weights' dtype whatever the caller's
        autocast, e.g. Lightning bf16-mixed) and, when vae_needs_upcast, the VAE in float32 (restored after)."""
        upcast = self.vae_needs_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            with no_autocast(self.clip_mean.device):
                yield
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    # ------------------------------------------------------------ CLIP

    def clip_preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3, 224, 224] CLIP-normalised float32.

        Mirrors the pipeline's _encode_image: resize in [-1, 1] with antialiasing, then to [0, 1].
        """
        x = images.to(device=self.clip_mean.device, dtype=torch.float32)
        x = _resize_with_antialiasing(x, self.clip_size)
        x = (x + 1.0) / 2.0
        return (x - self.clip_mean) / self.clip_std

    @torch.no_grad()
    def encode_image_clip(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> image embeddings [B, 1, D] (the UNet's encoder_hidden_states)."""
        with no_autocast(self.clip_mean.device):
            pixels = self.clip_preprocess(images).to(self.image_encoder.dtype)
            return self.image_encoder(pixel_values=pixels).image_embeds.unsqueeze(1)

    # ------------------------------------------------------------ VAE

    @torch.no_grad()
    def encode_condition_latent(
        self,
        images: Tensor,
        noise_aug_strength: float | Tensor = 0.02,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> condition latent [B, 4, h, w]: mode of encode(image + s·ε), unscaled.

        noise_aug_strength: float or [B]; the same value goes into the UNet's added time ids.
        """
        noisy = noise_augment(images.float(), noise_aug_strength, generator)
        with self._encoding():
            return self.vae.encode(self._vae_in(noisy)).latent_dist.mode()

    @torch.no_grad()
    def encode_frames(
        self,
        frames: Tensor,
        sample: bool = True,
        generator: Optional[torch.Generator] = None,
        chunk_size: Optional[int] = None,
    ) -> Tensor:
        """[B, F, 3, H, W] in [-1, 1] -> target latents [B, F, 4, h, w], times scaling_factor.

        sample=True draws from the posterior (training targets, as the SVD fine-tuning scripts);
        sample=False takes its mode (deterministic; use it for cached latents). The encoder is
        per image, so frames are flattened and encoded chunk_size images at a time.
        """
        b, f = frames.shape[:2]
        flat = frames.flatten(0, 1)
        step = chunk_size or flat.shape[0]
        out = []
        with self._encoding():
            for i in range(0, flat.shape[0], step):
                dist = self.vae.encode(self._vae_in(flat[i : i + step])).latent_dist
                out.append(dist.sample(generator) if sample else dist.mode())
        latents = torch.cat(out) * self.scaling_factor
        return latents.unflatten(0, (b, f))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, decode_chunk_size: Optional[int] = None) -> Tensor:
        """Target latents [B, F, 4, h, w] -> frames [B, F, 3, H, W] float32, about [-1, 1].

        One video at a time, in chunks of decode_chunk_size frames (None: the whole video, so the
        temporal decoder sees the full orbit at once; smaller chunks bound memory, and each chunk
        is then decoded as a short video of its own). Peak memory is that of one chunk of one video
        whatever B is. With B = 1 this is exactly the SVD pipeline's decode_latents.
        """
        b, f = latents.shape[:2]
        step = f if decode_chunk_size is None else decode_chunk_size
        if step < 1:
            raise ValueError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")
        out = torch.empty(0)
        with no_autocast(self.clip_mean.device):
            for v in range(b):
                z = self._vae_in(latents[v] / self.scaling_factor)  # [F, 4, h, w]
                frames = torch.cat([decode_frames(self.vae, z[i : i + step], z[i : i + step].shape[0]).float()
                                    for i in range(0, f, step)])
                if v == 0:
                    out = frames.new_empty((b, *frames.shape))
                out[v] = frames
        return out


def no_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for `device`'s type (a no-op where autocast does not exist)."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def decode_frames(vae: AutoencoderKLTemporalDecoder | AutoencoderKL, z: Tensor, num_frames: int) -> Tensor:
    """Latents of videos of `num_frames` frames, flattened frames-first [B*F, C, h, w] -> images [B*F, 3, H, W]."""
    if isinstance(vae, AutoencoderKLTemporalDecoder):
        return vae.decode(z, num_frames=num_frames).sample
    return vae.decode(z).sample  # a per-image decoder


# ---------------------------------------------------------------- loading


def _is_local(path: str | os.PathLike) -> bool:
    return Path(path).exists() or str(path).startswith((".", "/", "~"))


def load_conditioning(
    pretrained: str | os.PathLike,
    torch_dtype: Optional[torch.dtype] = None,
    vae_dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = None,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> Conditioner:
    """Load CLIP + VAE (+ feature_extractor if present) from an SVD diffusers folder or hub id.

    torch_dtype (default float32) applies to both models; vae_dtype overrides it for the VAE.
    By default an fp16 VAE with force_upcast (SVD's config) stays float32, as the pipeline
    upcasts it to encode. variant="fp16" picks the hub's half-size weight files.
    """
    torch_dtype = torch_dtype or torch.float32
    if _is_local(pretrained):
        root = Path(pretrained).expanduser()
        missing = [d for d in (IMAGE_ENCODER_DIR, VAE_DIR) if not (root / d).is_dir()]
        if missing:
            raise Nova3DError(f"{root} is not an SVD diffusers folder: missing {', '.join(d + '/' for d in missing)}")
        pretrained = str(root)
    common = dict(revision=revision, local_files_only=local_files_only)
    try:
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            pretrained, subfolder=IMAGE_ENCODER_DIR, dtype=torch_dtype, variant=variant, **common
        )
        vae_config = AutoencoderKLTemporalDecoder.load_config(pretrained, subfolder=VAE_DIR, **common)
        vae_class = VAE_CLASSES.get(vae_config.get("_class_name"), AutoencoderKLTemporalDecoder)
        if vae_dtype is None:
            upcast = torch_dtype == torch.float16 and vae_config.get("force_upcast", True)
            vae_dtype = torch.float32 if upcast else torch_dtype
        vae = vae_class.from_pretrained(
            pretrained, subfolder=VAE_DIR, torch_dtype=vae_dtype, variant=variant, **common
        )
    except (OSError, ValueError) as err:
        raise Nova3DError(f"cannot load SVD conditioners from {pretrained}: {err}") from err
    # Optional: only its mean/std are used, and CLIP_MEAN/CLIP_STD are SVD's values anyway.
    feature_extractor = None
    if not _is_local(pretrained) or (Path(pretrained) / FEATURE_EXTRACTOR_DIR).is_dir():
        try:
            feature_extractor = CLIPImageProcessor.from_pretrained(pretrained, subfolder=FEATURE_EXTRACTOR_DIR, **common)
        except (OSError, ValueError):
            feature_extractor = None
    return Conditioner(image_encoder, vae, feature_extractor)


# ---------------------------------------------------------------- tiny models for tests


def tiny_clip_vision_config() -> dict:
    """A CPU-milliseconds CLIP: 224 px input (so the pipeline's fixed 224 resize applies), 7x7 patches.

    projection_dim 32 matches the tiny UNet's cross_attention_dim (nova3d.models.svd_configs).
    """
    return dict(
        hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, image_size=224, patch_size=32,
    )


def tiny_vae_config() -> dict:
    """A tiny AutoencoderKLTemporalDecoder: 2 levels, so latents are H/2 x W/2."""
    return dict(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    )


def build_tiny_components(
    seed: int = 0,
) -> tuple[CLIPVisionModelWithProjection, AutoencoderKLTemporalDecoder, CLIPImageProcessor]:
    """Random tiny CLIP, VAE and an SVD-style feature extractor (for save_pretrained in tests)."""
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_clip_vision_config())).eval()
    vae = AutoencoderKLTemporalDecoder(**tiny_vae_config()).eval()
    feature_extractor = CLIPImageProcessor()  # defaults = SVD's: 224, OpenAI CLIP mean/std
    return image_encoder, vae, feature_extractor


def build_tiny_conditioner(seed: int = 0) -> Conditioner:
    return Conditioner(*build_tiny_components(seed))


# ---------------------------------------------------------------- latent cache


def latents_to_cache(latents: Tensor) -> np.ndarray:
    """Latents (any shape, e.g. [F, 4, h, w]) -> contiguous float16 numpy for a shard.

    Scaled latents are O(1), so float16 keeps ~3 significant digits; anything non-finite or
    beyond float16 range is an error rather than a silent inf.
    """
    x = latents.detach().float().cpu()
    if not torch.isfinite(x).all() or x.abs().max() > FP16_MAX:
        raise ValueError("latents are not finite or exceed the float16 range; cannot cache them")
    return np.ascontiguousarray(x.numpy().astype(np.float16))


def latents_from_cache(
    array: np.ndarray, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of latents_to_cache: float16 numpy -> tensor of `dtype` on `device`, same shape."""
    return torch.from_numpy(np.asarray(array, dtype=np.float16)).to(device=device, dtype=dtype)


def latents_to_bytes(latents: Tensor) -> bytes:
    """latents_to_cache as .npy bytes (a WebDataset sample value under a `.npy` key)."""
    buf = io.BytesIO()
    np.save(buf, latents_to_cache(latents), allow_pickle=False)
    return buf.getvalue()


def latents_from_bytes(data: bytes, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    return latents_from_cache(np.load(io.BytesIO(data), allow_pickle=False), device, dtype)
