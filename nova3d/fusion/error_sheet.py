"""Where a fused mesh misses its views, as a picture: the true views, the mesh rendered at their
cameras, and the per-pixel colour error as a heatmap (bench/fusion_quality.py writes one per
object, at the 16 fitted cameras and at the held-out ones)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from nova3d.errors import Nova3DError
from nova3d.fusion.preview import _LABEL, _tiles, colorbar, colormap
from nova3d.viz import save_png_atomic, to_uint8

ERRORS_SHEET = "errors.png"  # in every `nova3d fuse` result: the mesh against the views it was fitted to
ROWS = ("true views", "fused mesh at their cameras", "error |mesh - view| (mean of RGB)")


def pixel_error(true: Tensor, rendered: Tensor, max_error: float) -> Tensor:
    """[V, 3, H, W] x 2 -> [V, H, W]: the mean absolute RGB error over max_error, clipped to [0, 1]."""
    return ((rendered.float() - true.float()).abs().mean(1) / max_error).clamp(0, 1)


def error_sheet(true: Tensor, rendered: Tensor, out_path: str | os.PathLike, titles: Sequence[str] | None = None,
                tile: int = 128, max_error: float = 0.5) -> Path:
    """One PNG of three rows (ROWS) for V views: true and rendered [V, 3, H, W] in [0, 1]. The
    heatmap is viridis from 0 to `max_error` (the colour bar on the right); `titles` default to
    "view k". Written atomically."""
    if true.shape != rendered.shape or true.dim() != 4 or true.shape[1] != 3:
        raise Nova3DError(f"{out_path}: views {tuple(true.shape)} and renders {tuple(rendered.shape)} "
                          "are not two [V, 3, H, W] batches of one shape")
    V = true.shape[0]
    titles = list(titles) if titles is not None else [f"view {k}" for k in range(V)]
    heat = (colormap(pixel_error(true, rendered, max_error).cpu()).numpy() * 255 + 0.5).astype(np.uint8)
    rows = [_tiles(to_uint8(true), tile, Image.BILINEAR), _tiles(to_uint8(rendered), tile, Image.BILINEAR),
            _tiles(heat, tile, Image.NEAREST)]
    bar_w, row_h = 52, tile + _LABEL
    sheet = Image.new("RGB", (V * tile + bar_w, len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, tiles in enumerate(rows):
        y = r * row_h
        if r:
            draw.text((4, y + 1), ROWS[r], fill="black")
        for k, image in enumerate(tiles):
            sheet.paste(image, (k * tile, y + _LABEL))
            if r == 0:
                draw.text((k * tile + 4, 1), titles[k], fill="black")
    bar_y = 2 * row_h + _LABEL
    sheet.paste(Image.fromarray(colorbar(tile)), (V * tile + 4, bar_y))
    draw.text((V * tile + 20, bar_y - 2), f"{max_error:g}", fill="black")
    draw.text((V * tile + 20, bar_y + tile - 10), "0", fill="black")
    return save_png_atomic(sheet, out_path)


def error_tile_origin(row: int, view: int, tile: int = 128) -> tuple[int, int]:
    """(x, y) of the top-left pixel of `view`'s tile in `row` (0: true, 1: mesh, 2: error)."""
    return view * tile, row * (tile + _LABEL) + _LABEL


def views_error_sheet(true: Tensor, rendered: Tensor, psnr: Tensor, out_path: str | os.PathLike,
                      most: int = 8) -> Path:
    """error_sheet of at most `most` evenly spaced views (every other one of a 16-view orbit), each
    titled with its PSNR (psnr [V])."""
    shown = list(range(0, len(true), max(1, len(true) // most)))[:most]
    return error_sheet(true[shown], rendered[shown], out_path,
                       titles=[f"view {k}  {float(psnr[k]):.1f} dB" for k in shown])
