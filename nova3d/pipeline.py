"""Nova3DPipeline: one image -> an orbit of RGB and normal views from the GTA-SVD UNet.

A diffusers `DiffusionPipeline` (save_pretrained / from_pretrained) that samples as
StableVideoDiffusionPipeline does, with the domains of each object denoised jointly:

* Condition (nova3d.models.denoiser, as SVD's pipeline builds it): the CLIP embedding of the
  image (cross-attention), its noise-augmented VAE latent concatenated to every frame (8 input
  channels), added time ids [fps - 1, motion_bucket_id, noise_aug_strength].
* The D domain videos (0 = RGB, 1 = normals) are stacked domain-major, [D*B, F, 4, h, w], and all
  get the same image condition. Classifier-free guidance doubles the batch *inside* each domain
  block, rows [D, (uncond, cond), B], because GTA pairs row m of every domain block
  (nova3d.models.gta); a [cfg, D, B] order would pair the wrong videos.
* EDM Euler sampling with per-frame guidance (nova3d.models.edm) on the σ schedule of the
  `scheduler` component (EulerDiscreteScheduler with SVD-xt's config: v-prediction, continuous
  timesteps), i.e. what the scheduler's own loop computes (tests/test_edm.py).

Masks come from the normal map: on the object it holds unit vectors, while the white
background (normals are composited as 2·bg − 1 in training, nova3d.data.views) decodes to
(1, 1, 1), of length √3; coverage = (√3 − |n|)/(√3 − 1), clamped. That also works for white
objects. A single-domain (RGB-only) model falls back to the colour distance from white.

Precision (issue 14): `from_pretrained(..., torch_dtype=torch.float16 | torch.bfloat16)` (or
`nova3d generate --dtype`) runs the UNet and CLIP in that dtype; the sampler's state and the
guidance combination stay float32 (nova3d.models.edm), and a float16 SVD VAE (force_upcast) encodes
the condition in float32 and decodes in float16, as StableVideoDiffusionPipeline does
(nova3d.models.conditioning). A float32 pipeline computes the condition exactly as training does.

Decoding: one video at a time, `decode_chunk_size` frames per VAE call (default: the whole orbit,
so the temporal decoder sees every view; SVD's 14 would decode 16 views as 14 + 2 short videos).
Peak decode memory is that of one chunk of one video, whatever the batch.

Guidance default: `triangle` from 1 at the input view to 3 opposite it (2.87 at the two middle
views of 16: the peak falls between frames), SV3D's TrianglePredictionGuider for orbits. SVD's
`linear` 1 -> 3 ramps with time because later video frames drift further from the image; on an
orbit the view farthest from the input is the middle one and the last view is next to the input
again, so linear would over-guide the view that the input constrains most. Measured on the toy
recipe (docs/benchmarks.md) and selectable with `guidance_schedule="linear"`.

The image prior (`model.backbone: sd_image`) plugs in as the `unet` component unchanged: a
`GTAImageUNet` (nova3d.models.image_unet) is called like SVD's UNet and saves/loads the same way.

The GTA weights survive save/load because the UNet component is a `GTAUNet`: the diffusers UNet
class with GTA installed whose save/load use nova3d.models.unet's single-file format (full state
dict + GTAConfig in the safetensors metadata). diffusers' own loader would rebuild plain
processors and drop every `gta_*` weight. Its forward is diffusers' own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, AutoencoderKLTemporalDecoder, DiffusionPipeline, EulerDiscreteScheduler,
                       UNetSpatioTemporalConditionModel)
# diffusers finds a custom component's load method by looking its base classes up *in the
# component's module* (model_index.json names ["nova3d.pipeline", "GTAUNet"]): keep ModelMixin here.
from diffusers import ModelMixin  # noqa: F401
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from nova3d.cameras import Cameras, OrbitSpec, convert_normal_frame, encode_normals, orbit_cameras
from nova3d.models.conditioning import Conditioner
from nova3d.models.denoiser import ImageCondition, encode_image_condition, unet_forward
from nova3d.models import edm
from nova3d.models.gta import GTAConfig, install_gta, split_domains
# Imported here also so that diffusers can resolve ["nova3d.models.image_unet", "GTAImageUNet"] in model_index.json.
from nova3d.models.image_unet import GTAImageUNet
from nova3d.models.temporal_conv import use_fast_temporal_convs
from nova3d.models.unet import GTAWeightsFolder, checkpoint_temporal_blocks, read_gta_config

ImageInput = Union[PIL.Image.Image, Sequence[PIL.Image.Image], Tensor]
SQRT3 = math.sqrt(3.0)
MASK_THRESHOLD = 0.5  # coverage at or above this is "object" in binary masks
RGB_MASK_RANGE = 0.1  # RGB-only fallback: full coverage at this max-channel distance from white


class GTAUNet(GTAWeightsFolder, UNetSpatioTemporalConditionModel):
    """SVD's UNet with GTA installed. Same forward; only saving and loading differ.

    A folder holds `config.json` (the diffusers UNet config) and WEIGHTS_NAME, written by
    `save_gta_weights`. Loading rebuilds the architecture on the meta device, installs GTA with
    the stored GTAConfig, then loads every weight strictly. Local folders only.
    """


    @classmethod
    def build(cls, unet_config: Mapping[str, Any], gta: GTAConfig) -> "GTAUNet":
        """Random weights from a diffusers UNet config dict (tests, benchmarks)."""
        unet = cls.from_config(dict(unet_config))
        checkpoint_temporal_blocks(unet)
        return install_gta(unet, gta)

    @classmethod
    def from_unet(cls, unet: UNetSpatioTemporalConditionModel) -> "GTAUNet":
        """A GTAUNet sharing `unet`'s weight storage (no copy); `unet` must have GTA installed.

        For a vanilla UNet, install GTAConfig(num_domains=1) first (it adds nothing).
        """
        if isinstance(unet, cls):
            return unet
        gta = getattr(unet, "gta_config", None)
        if gta is None:
            raise ValueError("the UNet has no GTA installed (nova3d.models.gta.install_gta); "
                             "use GTAConfig(num_domains=1) for a vanilla RGB-only UNet")
        with torch.device("meta"):  # no allocation: the weights are assigned from `unet`
            new = cls.from_config(unet.config)
            checkpoint_temporal_blocks(new)
            install_gta(new, gta)
        new.load_state_dict(unet.state_dict(), strict=True, assign=True)
        if unet.is_gradient_checkpointing:
            new.enable_gradient_checkpointing()
        source = dict(unet.named_parameters())
        for name, p in new.named_parameters():
            p.requires_grad_(source[name].requires_grad)
        return new.train(unet.training)

    @classmethod
    def _build_on_meta(cls, config: Mapping[str, Any], weights: Path) -> "GTAUNet":
        unet = cls.from_config(config)
        checkpoint_temporal_blocks(unet)
        return install_gta(unet, read_gta_config(weights))


@dataclass
class Nova3DPipelineOutput:
    """Views of B objects, F views each; tensors on the pipeline's device ("pt") or PIL ("pil")."""

    rgb: Any  # [B, F, 3, H, W] in [0, 1] on white | B lists of F RGB images
    normals: Any  # [B, F, 3, H, W] unit vectors, input-view frame | B lists of (n+1)/2 images | None (RGB-only)
    masks: Any  # [B, F, 1, H, W] coverage in [0, 1] | B lists of "L" images
    cameras: Cameras  # the orbit shared by every object (view 0 = input view), normal_frame "input_view"


def normal_coverage(normals: Tensor) -> Tensor:
    """Raw decoded normal maps [..., 3, H, W] (about [-1, 1]) -> coverage [..., 1, H, W] in [0, 1]."""
    length = normals.float().norm(dim=-3, keepdim=True)
    return ((SQRT3 - length) / (SQRT3 - 1)).clamp(0, 1)


def rgb_coverage(rgb: Tensor) -> Tensor:
    """RGB [..., 3, H, W] in [0, 1] on white -> coverage [..., 1, H, W] (white objects are lost)."""
    return ((1 - rgb.float()).amax(dim=-3, keepdim=True) / RGB_MASK_RANGE).clamp(0, 1)


def _pil_views(x: Tensor, mode: str) -> list[list[PIL.Image.Image]]:
    """[B, F, C, H, W] in [0, 1] -> B lists of F PIL images."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    if mode == "L":
        arr = arr[..., 0]
    return [[PIL.Image.fromarray(view, mode) for view in obj] for obj in arr]


class Nova3DPipeline(DiffusionPipeline):
    """Image -> F orbit views of RGB + normals (+ masks, cameras). See the module docstring.

    Config values: num_frames (views), resolution (pixels, square), the orbit (fov_deg, radius,
    elevation_deg; azimuth 360/F·k, view 0 = input view), normal_frame (frame the model was
    trained to produce normals in; outputs are always converted to "input_view"), SVD's fps /
    motion_bucket_id / noise_aug_strength, and gta (the UNet's GTAConfig, also in its weights file).
    """

    model_cpu_offload_seq = "image_encoder->unet->vae"
    _optional_components = ["feature_extractor"]

    def __init__(
        self,
        unet: Union[UNetSpatioTemporalConditionModel, GTAImageUNet],  # the video or the image prior
        vae: Union[AutoencoderKLTemporalDecoder, AutoencoderKL],  # AutoencoderKL: the toy recipe's (models/autoencoder.py)
        image_encoder: CLIPVisionModelWithProjection,
        scheduler: EulerDiscreteScheduler,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        num_frames: int = 16,
        resolution: int = 256,
        fov_deg: float = 49.1,
        radius: float = 1.5,
        elevation_deg: float = 0.0,
        normal_frame: str = "input_view",
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        gta: Optional[dict] = None,  # from model_index.json when loading; must match the UNet's
    ):
        super().__init__()
        if not isinstance(unet, GTAImageUNet):  # the image prior saves and loads itself already
            unet = GTAUNet.from_unet(unet)
        use_fast_temporal_convs(unet), use_fast_temporal_convs(vae)  # same weights and outputs, faster on CPU
        if gta is not None and GTAConfig.from_dict(gta) != unet.gta_config:
            raise ValueError(f"pipeline config says GTA {gta}, the UNet has {unet.gta_config}")
        self.register_modules(unet=unet, vae=vae, image_encoder=image_encoder, scheduler=scheduler,
                              feature_extractor=feature_extractor)
        self.register_to_config(
            num_frames=num_frames, resolution=resolution, fov_deg=fov_deg, radius=radius,
            elevation_deg=elevation_deg, normal_frame=normal_frame, fps=fps, motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength, gta=dataclasses.asdict(unet.gta_config))

    @property
    def num_domains(self) -> int:
        return self.unet.gta_config.num_domains

    def conditioner(self) -> Conditioner:
        """The frozen CLIP + VAE wrapper over this pipeline's components (cheap; made per call)."""
        return Conditioner(self.image_encoder, self.vae, self.feature_extractor).to(self._execution_device)

    def cameras(self, num_frames: Optional[int] = None) -> Cameras:
        c = self.config
        return orbit_cameras(OrbitSpec(num_views=num_frames or c.num_frames, elevation_deg=c.elevation_deg,
                                       radius=c.radius, fov_deg=c.fov_deg, resolution=c.resolution))

    def sigmas(self, num_inference_steps: int) -> Tensor:
        """[N + 1] σ of the scheduler's schedule, ending in 0 (our loop is EDM Euler on them)."""
        c = self.scheduler.config
        if c.get("prediction_type") != "v_prediction" or c.get("timestep_type") != "continuous":
            raise ValueError("the scheduler must be SVD's EulerDiscreteScheduler (v_prediction, continuous timesteps)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        sigmas = self.scheduler.sigmas.float().cpu()
        if sigmas[-1] != 0:
            raise ValueError("the scheduler's σ schedule must end at 0")
        return sigmas

    # ------------------------------------------------------------ stages

    def image_tensor(self, image: ImageInput) -> Tensor:
        """PIL image(s) or [B, 3|4, H, W] / [3|4, H, W] in [0, 1] -> [B, 3, R, R] in [0, 1] on white.

        Alpha is composited on white, a non-square image is padded with white, then resized to
        the config resolution. No re-framing: use nova3d.preprocess.prepare_image for that.
        """
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if not isinstance(image, Tensor):
            arrays = [np.asarray(im.convert("RGBA"), dtype=np.float32) / 255 for im in image]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError("all images of a batch must have the same size")
            image = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        x = image.float().unsqueeze(0) if image.ndim == 3 else image.float()
        if x.ndim != 4 or x.shape[1] not in (3, 4):
            raise ValueError(f"expected [B, 3|4, H, W] images, got {tuple(image.shape)}")
        if x.shape[1] == 4:
            x = x[:, :3] * x[:, 3:] + (1 - x[:, 3:])
        h, w = x.shape[-2:]
        if h != w:  # pad the short side with white, keeping the object's aspect
            side = max(h, w)
            top, left = (side - h) // 2, (side - w) // 2
            x = F.pad(x, (left, side - w - left, top, side - h - top), value=1.0)
        r = self.config.resolution
        if x.shape[-1] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1)

    def encode_condition(self, images: Tensor, generator: Optional[torch.Generator] = None) -> ImageCondition:
        """[B, 3, R, R] in [0, 1] -> ImageCondition of B objects (noise augmentation drawn from `generator`)."""
        c = self.config
        cond = encode_image_condition(self.conditioner(), images.to(self._execution_device) * 2 - 1,
                                      noise_aug_strength=c.noise_aug_strength, fps=c.fps,
                                      motion_bucket_id=c.motion_bucket_id, generator=generator)
        return dataclasses.replace(cond, clip_embeds=cond.clip_embeds.to(self.unet.dtype))

    @torch.no_grad()
    def sample_latents(
        self,
        cond: ImageCondition,
        num_frames: int,
        num_inference_steps: int,
        guidance: Tensor | float,  # [F] per-frame scales or one value
        generator: Optional[torch.Generator] = None,
        progress: bool = True,
    ) -> Tensor:  # [D*B, F, 4, h, w] float32, domain-major
        d, b = self.num_domains, cond.latent.shape[0]
        device, dtype = self._execution_device, self.unet.dtype
        sigmas = self.sigmas(num_inference_steps)
        # Initial noise as edm.sample draws it: on the generator's device, scaled by √(σ_0² + 1).
        shape = (d * b, num_frames, *cond.latent.shape[1:])
        gen_device = generator.device if generator is not None else device
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
        x = x * math.sqrt(float(sigmas[0]) ** 2 + 1)
        g = torch.as_tensor(guidance, device=device, dtype=torch.float32)
        g = g.view(1, -1, 1, 1, 1) if g.ndim == 1 else g  # frames are axis 1
        do_cfg = bool((g > 1).any())  # SVD's rule: no unconditional pass without guidance
        if do_cfg:  # condition rows (uncond, cond) x B, repeated per domain by unet_forward
            u = cond.unconditional()
            cond = ImageCondition(torch.cat([u.clip_embeds, cond.clip_embeds]), torch.cat([u.latent, cond.latent]),
                                  torch.cat([cond.added_time_ids, cond.added_time_ids]))
        model_fn = partial(unet_forward, self.unet, cond=cond, num_domains=d)
        bar = tqdm(total=num_inference_steps, **{"desc": "denoising", **getattr(self, "_progress_bar_config", {}),
                                                 **({} if progress else {"disable": True})})
        for i in range(num_inference_steps):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            # [D*B] -> [D, (2, B)] -> [D*2B]: guidance copies stay inside each domain block.
            x_in = torch.cat([x.unflatten(0, (d, b))] * 2, dim=1).flatten(0, 1) if do_cfg else x
            den = edm.denoise(model_fn, x_in.to(dtype), torch.full((x_in.shape[0],), s, device=device))
            if do_cfg:
                den = den.unflatten(0, (d, 2, b))
                den_u, den_c = den[:, 0].flatten(0, 1), den[:, 1].flatten(0, 1)
                den = den_u + g * (den_c - den_u)
            x = edm.euler_step(x, den, s, s_next)
            bar.update()
        bar.close()
        return x

    @torch.no_grad()
    def decode(self, latents: Tensor, output_type: str = "pt", decode_chunk_size: Optional[int] = None
               ) -> Nova3DPipelineOutput:
        """Domain-major latents [D*B, F, 4, h, w] -> views, masks and cameras.

        Each of the D*B videos is decoded on its own, decode_chunk_size frames per VAE call
        (None: the whole orbit in one call)."""
        if output_type not in ("pt", "pil"):
            raise ValueError(f"output_type must be 'pt' or 'pil', got {output_type!r}")
        if decode_chunk_size is not None and decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")
        d, num_frames = self.num_domains, latents.shape[1]
        frames = self.conditioner().decode_latents(latents, decode_chunk_size)
        views = split_domains(frames, d)  # [D, B, F, 3, H, W], about [-1, 1]
        rgb = ((views[0] + 1) / 2).clamp(0, 1)
        cameras = self.cameras(num_frames)
        normals = None
        if d > 1:
            masks = normal_coverage(views[1])
            normals = F.normalize(views[1], dim=2)
            if self.config.normal_frame != "input_view":
                normals = torch.stack([convert_normal_frame(n.permute(0, 2, 3, 1), cameras.c2w, self.config.normal_frame,
                                                            "input_view").permute(0, 3, 1, 2) for n in normals])
        else:
            masks = rgb_coverage(rgb)
        if output_type == "pil":
            normals = None if normals is None else _pil_views(encode_normals(normals), "RGB")
            return Nova3DPipelineOutput(_pil_views(rgb, "RGB"), normals, _pil_views(masks, "L"), cameras)
        return Nova3DPipelineOutput(rgb, normals, masks, cameras)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 25,
        guidance: Sequence[float] = (1.0, 3.0),
        guidance_schedule: str = "triangle",
        generator: Optional[torch.Generator] = None,
        output_type: str = "pt",
        progress: bool = True,
        num_frames: Optional[int] = None,
        decode_chunk_size: Optional[int] = None,
    ) -> Nova3DPipelineOutput:
        """Generate the orbit views of each input image.

        image: PIL image(s) or [B, 3|4, H, W] in [0, 1], framed like the training renders
        (nova3d.preprocess.prepare_image). guidance: (min, max) per-frame CFG scales shaped by
        guidance_schedule: "triangle" (min at the input view, max opposite), "linear" (SVD) or
        "constant" (max); the module docstring says why triangle is the default. decode_chunk_size:
        frames per VAE decode call, per video (None: the whole orbit). Random draws, in SVD's
        order: condition noise augmentation, then the initial latents, all from `generator`.
        """
        num_frames = num_frames or self.config.num_frames
        if len(guidance) != 2:
            raise ValueError(f"guidance must be (min, max), got {guidance!r}")
        scales = edm.guidance_schedule(guidance_schedule, num_frames, float(guidance[0]), float(guidance[1]))
        images = self.image_tensor(image)
        cond = self.encode_condition(images, generator)
        latents = self.sample_latents(cond, num_frames, num_inference_steps, scales, generator, progress)
        self.maybe_free_model_hooks()
        return self.decode(latents, output_type, decode_chunk_size)

