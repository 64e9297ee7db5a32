"""Pictures people look at: contact sheets of multi-view samples (input | RGB views | normal views)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from nova3d.atomic import atomic_path

_LABEL_HEIGHT = 14


def to_uint8(images: Tensor) -> np.ndarray:
    """[..., 3, H, W] floats in [0, 1] -> [..., H, W, 3] uint8."""
    return (images.detach().float().clamp(0, 1).movedim(-3, -1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def contact_sheet(input_image: Tensor, rgb: Tensor, normals: Tensor | None = None,
                  labels: Sequence[str] | None = None, tile: int = 128) -> Image.Image:
    """One picture of a sample.

    input_image [3, H, W] and rgb [V, 3, H, W] in [0, 1]; normals [V, 3, H, W] in [-1, 1]
    (shown encoded as (n + 1) / 2). Row 1: the input, then the V RGB views; row 2 (if
    normals are given): the V normal views under their RGB view. `labels` name the views.
    """
    def resized(images: Tensor) -> list[Image.Image]:
        return [Image.fromarray(a).resize((tile, tile), Image.BILINEAR) for a in to_uint8(images)]

    rows = [resized(rgb)] + ([resized((normals + 1) / 2)] if normals is not None else [])
    num_views = rgb.shape[0]
    row_height = tile + _LABEL_HEIGHT
    sheet = Image.new("RGB", ((num_views + 1) * tile, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(resized(input_image[None])[0], (0, _LABEL_HEIGHT))
    draw.text((4, 1), "input", fill="black")
    for r, tiles in enumerate(rows):
        if r:
            draw.text((4, r * row_height + 1), "normals", fill="black")
        for v, image in enumerate(tiles):
            x = (v + 1) * tile
            sheet.paste(image, (x, r * row_height + _LABEL_HEIGHT))
            if r == 0:
                draw.text((x + 4, 1), labels[v] if labels else f"view {v}", fill="black")
    return sheet


def save_png_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save a PNG under a temporary name, then rename, so no half-written picture is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def contact_sheet_from_shards(shards: str, out: str | os.PathLike, index: int = 0) -> Path:
    """Write the contact sheet of sample `index` (in shard order) as the evaluation loader sees it."""
    from nova3d.data.manifest import existing_shards
    from nova3d.data.shards import decode_sample, iter_tar_samples
    from nova3d.data.views import make_views
    from nova3d.errors import Nova3DError

    seen = 0
    for url in existing_shards(shards):
        for raw in iter_tar_samples(url):
            if seen == index:
                obj = decode_sample(raw)
                views = list(range(len(obj.cameras)))
                sample = make_views(obj, views, resolution=obj.rgba.shape[-1], normal_frame="input_view",
                                    background=torch.ones(3))
                labels = [f"{float(a) % 360:.1f}°" for a in sample.azimuth_deg]
                sheet = contact_sheet(sample.input_image, sample.rgb, sample.normals, labels)
                return save_png_atomic(sheet, out)
            seen += 1
    raise Nova3DError(f"{shards}: asked for sample {index} but the shards hold {seen}")
