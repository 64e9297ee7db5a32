"""16-bit PNG writing and bit-depth-preserving PNG reading for object folders.

Images are decoded with torchvision's libpng binding, which keeps 16 bits (Pillow reads
16-bit RGB PNGs as 8-bit); 16-bit PNGs are written here with numpy + zlib for the same reason.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_png

from nova3d.data.sample_error import INVALID, UNDECODABLE, SampleError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _paeth_filter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """PNG filter type 4 of every row [H, B] uint8 (vectorised: filtering only reads raw bytes)."""
    a, b, c = np.zeros_like(rows), np.zeros_like(rows), np.zeros_like(rows)
    a[:, bpp:], b[1:], c[1:, bpp:] = rows[:, :-bpp], rows[:-1], rows[:-1, :-bpp]  # left, up, up-left
    a16, b16, c16 = a.astype(np.int16), b.astype(np.int16), c.astype(np.int16)
    p = a16 + b16 - c16
    pa, pb, pc = np.abs(p - a16), np.abs(p - b16), np.abs(p - c16)
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return rows - pred  # uint8 arithmetic wraps modulo 256, as PNG wants


def encode_png16(image: np.ndarray, level: int = 6) -> bytes:
    """[H, W, C] uint16 (C in 1..4) -> 16-bit PNG bytes (Paeth filter, zlib `level`)."""
    if image.dtype != np.uint16 or image.ndim != 3 or image.shape[2] not in _PNG_COLOUR_TYPES:
        raise ValueError(f"encode_png16 wants [H, W, 1..4] uint16, got {image.shape} {image.dtype}")
    h, w, ch = image.shape
    rows = np.ascontiguousarray(image.astype(">u2")).view(np.uint8).reshape(h, w * ch * 2)
    scanlines = np.concatenate([np.full((h, 1), 4, np.uint8), _paeth_filter(rows, bpp=2 * ch)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 16, _PNG_COLOUR_TYPES[ch], 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), level)) + _png_chunk(b"IEND", b""))


def read_png(path: str | os.PathLike, channels: int, dtype: type) -> np.ndarray:
    """A PNG file as [channels, H, W] `dtype` (uint8 or uint16), bit depth kept; else SampleError."""
    try:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        image = decode_png(data, mode=ImageReadMode.UNCHANGED).numpy()
    except (OSError, RuntimeError, ValueError) as err:
        raise SampleError(UNDECODABLE, f"{path}: not a readable PNG ({str(err).splitlines()[0]})") from err
    if image.shape[0] != channels or image.dtype != dtype:
        raise SampleError(INVALID, f"{path}: {image.shape[0]} channels of {image.dtype}, "
                                   f"expected {channels} of {np.dtype(dtype)}")
    return image
