"""`nova3d generate`: one image -> an object folder of generated views (nova3d.data.schema).

The folder has the layout of the Blender renders, so fusion and the shard writer read both
alike: rgb/ RGBA8 (straight colour; alpha = the pipeline's coverage estimate), normal/ RGB16
(n + 1)/2 in the input-view frame (0 -> 0.5 off the object, as the renders store it), mask/ L8
(coverage >= 0.5), cameras.json (nova3d.cameras.orbit_cameras with the pipeline's orbit),
meta.json (source "generated:<model folder>"). Written as <id>.partial, then renamed
(nova3d.atomic.staged_folder).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image
import torch

from nova3d.atomic import staged_folder
from nova3d.data import schema
from nova3d.devices import resolve_device
from nova3d import number_checks as num
from nova3d.errors import Nova3DError
from nova3d.weights_check import check_loaded_weights, check_pipeline_folder, check_safetensors  # noqa: F401
from nova3d.weights_check import describe_load_error

GUIDANCE_SCHEDULES = ("triangle", "linear", "constant")
PIPELINE_CLASS = "Nova3DPipeline"
# --dtype: the UNet and CLIP run in it (a float16 SVD VAE encodes in float32, nova3d.pipeline says how).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GenerateSettings:
    steps: int = 25
    seed: int = 0
    guidance: tuple[float, float] = (1.0, 3.0)  # (min, max) per-frame CFG scale
    schedule: str = "triangle"
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:N"
    progress: bool = True
    dtype: str = "float32"  # one of DTYPES; float16/bfloat16 halve the weights' memory (24 GB cards)
    decode_chunk_size: Optional[int] = None  # frames per VAE decode call, per video; None: the whole orbit

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise Nova3DError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.decode_chunk_size is not None and self.decode_chunk_size < 1:
            raise Nova3DError(f"--decode-chunk-size must be >= 1, got {self.decode_chunk_size}")
        if self.steps < 1:
            raise Nova3DError(f"--steps must be >= 1, got {self.steps}")
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise Nova3DError(f"--schedule must be one of {GUIDANCE_SCHEDULES}, got {self.schedule!r}")
        if len(self.guidance) != 2 or min(self.guidance) < 0:
            raise Nova3DError(f"--guidance takes MIN MAX (non-negative), got {list(self.guidance)}")
        for g in self.guidance:  # NaN passes the test above; inf or 1e9 saturate every view
            num.in_range("--guidance", g, 0, num.GUIDANCE_MAX)
        num.seed("--seed", self.seed)


def check_model_dir(model: str | Path) -> tuple[Path, dict]:
    """(model folder, its model_index.json), or a Nova3DError naming the file and what is wrong."""
    return check_pipeline_folder(model)  # folder, index, every safetensors header (nova3d.weights_check)


def load_pipeline(model: str | Path, device: torch.device, dtype: str = "float32"):
    from diffusers.utils import is_accelerate_available

    from nova3d.pipeline import Nova3DPipeline

    if dtype not in DTYPES:
        raise Nova3DError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    root, _ = check_model_dir(model)
    try:  # low_cpu_mem_usage needs accelerate; saying so avoids diffusers' warning without it
        pipe = Nova3DPipeline.from_pretrained(str(root), low_cpu_mem_usage=is_accelerate_available(),
                                              dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise describe_load_error(root, err) from err
    check_loaded_weights(pipe, root)  # NaN/inf weights: one line naming the file, not blank views
    return pipe.to(device)


def generate_object(image: str | Path, model: str | Path, out: str | Path,
                    settings: GenerateSettings = GenerateSettings(), object_id: Optional[str] = None) -> Path:
    """Generate the views of `image` with the pipeline saved in `model`; returns out/<object_id>/."""
    from nova3d.preprocess import prepare_image

    settings.check()
    device = resolve_device(settings.device)
    model_root, config = check_model_dir(model)  # cheap checks first: fail before loading any weights
    try:
        object_id = schema.safe_object_id(object_id or Path(image).stem)
    except ValueError as err:
        raise Nova3DError(str(err)) from err
    out = Path(out)
    final = out / object_id
    if final.exists():
        raise Nova3DError(f"{final} already exists; remove it or choose another --out")
    try:
        orbit = {k: config[k] for k in ("resolution", "fov_deg", "radius")}
    except KeyError as err:
        raise Nova3DError(f"{model_root}/model_index.json lacks {err}") from err
    prepared = prepare_image(image, size=orbit["resolution"], fov_deg=orbit["fov_deg"], radius=orbit["radius"])
    pipe = load_pipeline(model_root, device, settings.dtype)
    if pipe.num_domains < 2:
        raise Nova3DError(f"{model_root} generates RGB only; an object folder needs normal maps")
    return generate_into(pipe, prepared.image, out, object_id, settings, model_root, {
        "image": prepared.source, "preprocess": {"fill": prepared.fill, "bbox": list(prepared.bbox),
                                                 "background_removed": prepared.background_removed}})


def generate_into(pipe, image, out: str | Path, object_id: str, settings: GenerateSettings,
                  model_root: str | Path, image_info: dict) -> Path:
    """Generate the views of one framed image (a PIL image or [3, H, W] in [0, 1] on white) with a
    loaded Nova3DPipeline and write them as out/<object_id>/; `image_info` goes into meta.json."""
    model_root = Path(model_root)
    generator = torch.Generator().manual_seed(settings.seed)  # CPU: the same seed gives the same views anywhere
    result = pipe(image, num_inference_steps=settings.steps, guidance=settings.guidance,
                  guidance_schedule=settings.schedule, generator=generator, output_type="pt",
                  progress=settings.progress, decode_chunk_size=settings.decode_chunk_size)
    cameras = result.cameras
    cameras.extra = {"object_id": object_id, "start_azimuth_deg": 0.0, "generated": True}
    meta = schema.ObjectMeta(
        object_id=object_id, source=f"generated:{model_root.resolve()}", num_views=len(cameras),
        resolution=pipe.config.resolution, normalisation={},
        renderer={"name": "nova3d.pipeline", "class": PIPELINE_CLASS, "gta": dict(pipe.config.gta)},
        settings={**{k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
                  "guidance": list(settings.guidance), "device": str(pipe.device), **image_info,
                  "fov_deg": pipe.config.fov_deg, "radius": pipe.config.radius,
                  "elevation_deg": [pipe.config.elevation_deg], "normal_frame": cameras.normal_frame,
                  "background": "white", "mask": "normal-map coverage >= 0.5 (nova3d.pipeline.normal_coverage)"})
    write_object_folder(Path(out), object_id, result.rgb[0], result.normals[0], result.masks[0], cameras, meta)
    return Path(out) / object_id


def write_object_folder(out: Path, object_id: str, rgb: torch.Tensor, normals: torch.Tensor, masks: torch.Tensor,
                        cameras, meta: schema.ObjectMeta) -> Path:
    """Write one object's views atomically. rgb, normals: [F, 3, H, W]; masks: [F, 1, H, W] coverage."""
    from nova3d.data.png import encode_png16
    from nova3d.pipeline import MASK_THRESHOLD

    final = out / object_id
    rgb, normals, alpha = rgb.float().cpu(), normals.float().cpu(), masks.float().cpu().clamp(0, 1)
    # Straight colour: the decoded views are composited on white, c = a·s + (1 − a).
    straight = ((rgb - (1 - alpha)) / alpha.clamp_min(1 / 255)).clamp(0, 1)
    straight = torch.where(alpha > 1 / 255, straight, rgb)
    binary = alpha >= MASK_THRESHOLD
    stored_normals = torch.where(binary, normals, torch.zeros_like(normals))
    with staged_folder(final) as partial:  # an error or a signal leaves neither a half folder nor a .partial
        for sub in (schema.RGB_DIR, schema.NORMAL_DIR, schema.MASK_DIR):
            (partial / sub).mkdir()
        for i in range(rgb.shape[0]):
            name = schema.view_name(i)
            rgba = torch.cat([straight[i], alpha[i]]).permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
            PIL.Image.fromarray(rgba, "RGBA").save(partial / schema.RGB_DIR / name)
            encoded = ((stored_normals[i].permute(1, 2, 0) + 1) / 2 * 65535).round().clamp(0, 65535)
            (partial / schema.NORMAL_DIR / name).write_bytes(encode_png16(encoded.numpy().astype(np.uint16)))
            mask = binary[i, 0].numpy().astype(np.uint8) * 255
            PIL.Image.fromarray(mask, "L").save(partial / schema.MASK_DIR / name)
        cameras.save(partial / schema.CAMERAS_FILE)
        meta.save(partial / schema.META_FILE)
    return final

