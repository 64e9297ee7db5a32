"""Input-image preprocessing: frame a user's image the way the training renders are framed.

Training views show an object normalised to a unit bounding box (longest side 1), centred at
the origin, seen from radius 1.5 with a 49.1° FOV (nova3d.cameras). `training_fill` computes,
from those cameras, the fraction of the frame width that a length-1 object at the orbit centre
spans: 1 / (2·r·tan(fov/2)) = 0.730 for the defaults. (A unit *cube*'s front face, 0.5 nearer,
would span 1.09 and overflow the frame, so the centre plane is the meaningful reference.)

`prepare_image`: RGBA -> crop to the alpha bounding box -> scale so its longest side spans
`fill` of the frame -> centre -> composite on white. An RGB image without alpha gets a simple
background removal when its border is (near-)uniform: alpha from the colour distance to the
border colour; otherwise a Nova3DError says how to supply a mask. Every problem with the input
is a Nova3DError naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from nova3d.cameras import OrbitSpec, orbit_cameras, project_points
from nova3d.errors import Nova3DError

MIN_SIDE = 64  # pixels: smaller inputs carry too little to condition on
ALPHA_EPS = 8 / 255  # alpha above this counts for the bounding box (ignores faint matting noise)
BORDER_TOLERANCE = 0.08  # 95th-percentile colour deviation along the border that still counts as uniform
MIN_KEY_DISTANCE = 0.12  # background removal: colour distance at which a pixel is fully object
OPAQUE = 254 / 255  # an alpha channel that is this opaque everywhere carries no mask
# 16-bit greyscale PNGs open in these modes; PIL's convert("RGBA") clips them at 255 (all white),
# which then reads as an empty mask: scale them by their full range instead.
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

ImageSource = Union[str, os.PathLike, PIL.Image.Image]


@dataclass
class PreparedImage:
    """An input framed like the training renders."""

    image: PIL.Image.Image  # RGB, size x size, composited on white
    alpha: np.ndarray  # [size, size] float32 coverage after framing
    source: str  # file path, or "<image>" for an in-memory image
    bbox: tuple[int, int, int, int]  # (left, top, right, bottom) of the object in the source, exclusive
    fill: float  # fraction of the frame the object's longest side spans
    background_removed: bool  # True: alpha came from border-colour removal, not from the file


def training_fill(fov_deg: float = 49.1, radius: float = 1.5) -> float:
    """Fraction of the frame width a length-1 segment through the orbit centre spans (nova3d.cameras)."""
    cams = orbit_cameras(OrbitSpec(num_views=1, radius=radius, fov_deg=fov_deg, resolution=1000))
    ends = torch.tensor([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])  # across the input view, at the centre depth
    pix, _ = project_points(ends, cams.c2w, cams.K)
    return float((pix[0, 1, 0] - pix[0, 0, 0]).abs()) / cams.width


def load_rgba(source: ImageSource) -> tuple[np.ndarray, bool, str]:
    """Image -> ([H, W, 4] float32 in [0, 1], whether it carries a real alpha mask, name)."""
    name = "<image>" if isinstance(source, PIL.Image.Image) else str(source)
    try:
        image = source if isinstance(source, PIL.Image.Image) else PIL.Image.open(source)
        image.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        reason = "file not found" if isinstance(err, FileNotFoundError) else str(err).splitlines()[0]
        raise Nova3DError(f"{name}: cannot read the image ({reason})") from err
    if min(image.size) < MIN_SIDE:
        raise Nova3DError(f"{name}: image is {image.width}x{image.height}; at least {MIN_SIDE} px per side is needed")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if image.mode in WIDE_GREY_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1)
        rgba = np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
        return rgba, False, name
    if image.mode == "F":
        raise Nova3DError(f"{name}: a 32-bit float image has no defined range; save it as an 8- or 16-bit PNG")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
    return rgba, bool(has_alpha and rgba[..., 3].min() < OPAQUE), name


def remove_uniform_background(rgb: np.ndarray, name: str = "<image>") -> np.ndarray:
    """[H, W, 3] in [0, 1] with a (near-)uniform border -> alpha [H, W] from the distance to it.

    Simple keying: parts of the object in the background colour become transparent too.
    """
    h, w, _ = rgb.shape
    ring = max(1, min(h, w) // 64)
    border = np.concatenate([rgb[:ring].reshape(-1, 3), rgb[-ring:].reshape(-1, 3),
                             rgb[:, :ring].reshape(-1, 3), rgb[:, -ring:].reshape(-1, 3)])
    colour = np.median(border, axis=0)
    noise = float(np.quantile(np.abs(border - colour).max(axis=1), 0.95))
    if noise > BORDER_TOLERANCE:
        raise Nova3DError(f"{name}: no alpha channel and the background is not uniform; supply an RGBA PNG "
                          "with the object masked (e.g. made with rembg or SAM)")
    full = max(MIN_KEY_DISTANCE, 3 * noise)
    distance = np.abs(rgb - colour).max(axis=2)
    return np.clip((distance - full / 2) / (full / 2), 0, 1).astype(np.float32)  # ramp from full/2 to full


def frame_object(rgba: np.ndarray, size: int, fill: float, name: str = "<image>"
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """[H, W, 4] straight RGBA -> [size, size, 4] with the alpha bbox centred, longest side = fill·size."""
    alpha = rgba[..., 3]
    rows, cols = np.nonzero(alpha > ALPHA_EPS)
    if rows.size == 0 or (alpha >= 0.5).sum() == 0:
        raise Nova3DError(f"{name}: the alpha mask is empty; nothing to generate from")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = torch.from_numpy(np.ascontiguousarray(rgba[top:bottom, left:right])).permute(2, 0, 1)
    crop = torch.cat([crop[:3] * crop[3:], crop[3:]])  # premultiplied: resizing never mixes in the old background
    scale = fill * size / max(bottom - top, right - left)
    new_h, new_w = (max(1, min(size, round(n * scale))) for n in (bottom - top, right - left))
    resized = F.interpolate(crop[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                            align_corners=False)[0].clamp(0, 1)
    out = torch.zeros(4, size, size)
    y0, x0 = (size - new_h) // 2, (size - new_w) // 2
    out[:, y0:y0 + new_h, x0:x0 + new_w] = resized
    return out.permute(1, 2, 0).numpy(), (int(left), int(top), int(right), int(bottom))


def prepare_image(source: ImageSource, size: int = 256, fill: Optional[float] = None,
                  fov_deg: float = 49.1, radius: float = 1.5) -> PreparedImage:
    """Load, mask if needed, frame and composite on white (module docstring). fill: default training_fill."""
    fill = training_fill(fov_deg, radius) if fill is None else fill
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    rgba, has_alpha, name = load_rgba(source)
    if not has_alpha:
        rgba = np.concatenate([rgba[..., :3], remove_uniform_background(rgba[..., :3], name)[..., None]], axis=2)
    framed, bbox = frame_object(rgba, size, fill, name)
    premultiplied, alpha = framed[..., :3], framed[..., 3:]
    on_white = premultiplied + (1 - alpha)
    image = PIL.Image.fromarray((on_white.clip(0, 1) * 255).round().astype(np.uint8), "RGB")
    return PreparedImage(image=image, alpha=alpha[..., 0].copy(), source=name, bbox=bbox, fill=fill,
                         background_removed=not has_alpha)
