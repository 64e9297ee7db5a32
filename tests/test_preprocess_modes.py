"""Image modes beyond 8-bit RGB(A) (issue 25, class 7): a 16-bit greyscale PNG used to be reported
as "the alpha mask is empty" (PIL clips it to white when converting to RGBA)."""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from nova3d.errors import Nova3DError
from nova3d.preprocess import prepare_image


def _square_on_white(path, dtype, white):
    pixels = np.full((128, 128), white, dtype)
    pixels[32:96, 40:88] = white // 3  # a grey object on a white background, no alpha
    PIL.Image.fromarray(pixels).save(path)
    return path


def test_a_16_bit_greyscale_png_is_framed_like_its_8_bit_copy(tmp_path):
    wide = prepare_image(_square_on_white(tmp_path / "wide.png", np.uint16, 65535), 64)
    narrow = prepare_image(_square_on_white(tmp_path / "narrow.png", np.uint8, 255), 64)
    assert PIL.Image.open(tmp_path / "wide.png").mode.startswith("I")  # really read as 16-bit
    assert wide.bbox == narrow.bbox == (40, 32, 88, 96)
    assert np.abs(np.asarray(wide.image, np.float32) - np.asarray(narrow.image, np.float32)).max() <= 1


def test_a_float_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "depth.tiff"
    PIL.Image.fromarray(np.ones((128, 128), np.float32)).save(path)
    with pytest.raises(Nova3DError, match="depth.tiff: a 32-bit float image"):
        prepare_image(path, 64)
