"""Model weights are checked when they load (issue 25, class 2): each broken pipeline folder gives
one error line naming the file and the problem, before any view is generated, and no output."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from nova3d.cli import main
from nova3d.models import edm
from nova3d.models.conditioning import build_tiny_components
from nova3d.models.gta import GTAConfig
from nova3d.models.svd_configs import tiny_unet_config
from nova3d.pipeline import GTAUNet, Nova3DPipeline
from test_image_to_3d import _disc_png, _error_line

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

UNET_WEIGHTS = "unet/gta_unet.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = GTAUNet.build(tiny_unet_config(), GTAConfig()).eval()
        image_encoder, vae, feature_extractor = build_tiny_components(0)
    scheduler = EulerDiscreteScheduler.from_config(edm.svd_xt_scheduler_config())
    pipe = Nova3DPipeline(unet, vae, image_encoder, scheduler, feature_extractor, num_frames=4, resolution=32)
    path = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(path)
    return path


def _nan_bytes(model):
    """0xFF over a stretch of tensor data: float32/16 NaNs, the header still valid."""
    path = model / UNET_WEIGHTS
    data = bytearray(path.read_bytes())
    start = int(len(data) * 0.7)
    data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return UNET_WEIGHTS, "non-finite"


def _empty(model):
    (model / UNET_WEIGHTS).write_bytes(b"")
    return UNET_WEIGHTS, "empty file"


def _truncated(model):
    path = model / UNET_WEIGHTS
    os.truncate(path, path.stat().st_size // 3)  # a copy cut off part-way
    return UNET_WEIGHTS, "truncated"


def _edit_json(model, rel, edit):
    path = model / rel
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _shapes(model):
    _edit_json(model, "unet/config.json", lambda c: c.update(block_out_channels=[c["block_out_channels"][0] * 2,
                                                                                  *c["block_out_channels"][1:]]))
    return "config.json", "does not match"


def _wrong_class(model):
    _edit_json(model, "model_index.json", lambda c: c.update(_class_name="StableVideoDiffusionPipeline"))
    return "model_index.json", "StableVideoDiffusionPipeline"


def _resolution_text(model):
    _edit_json(model, "model_index.json", lambda c: c.update(resolution="sixty-four"))
    return "model_index.json", "resolution must be a whole number"


CASES = {"nan_bytes": _nan_bytes, "zero_byte_file": _empty, "truncated_file": _truncated, "config_shapes": _shapes,
         "wrong_class": _wrong_class,
         "resolution_not_a_number": _resolution_text}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_weights_are_one_line_naming_the_file(case, saved, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    file_name, problem = CASES[case](model)
    image = _disc_png(tmp_path / "disc.png")
    code = main(["generate", "--image", str(image), "--model", str(model), "--out", str(tmp_path / "out"),
                 "--steps", "1", "--device", "cpu"])
    line = _error_line(capsys.readouterr().err, "generate")
    assert code == 2
    assert file_name in line and problem in line, line
    assert not (tmp_path / "out" / "disc").exists()


def test_model_pointing_at_a_file_says_so(saved, tmp_path, capsys):
    image = _disc_png(tmp_path / "disc.png")
    code = main(["generate", "--image", str(image), "--model", str(saved / UNET_WEIGHTS), "--out", str(tmp_path / "o")])
    line = _error_line(capsys.readouterr().err, "generate")
    assert code == 2 and "is a file" in line and "gta_unet.safetensors" in line


def test_good_weights_load(saved):
    from nova3d.generate import load_pipeline

    pipe = load_pipeline(saved, torch.device("cpu"))  # the finite check passes on a sound folder
    assert pipe.config.resolution == 32


def test_image_to_3d_names_non_finite_weights_not_empty_masks(saved, tmp_path, capsys):
    """issue 25: NaN weights gave blank views, and image-to-3d then blamed "empty masks"."""
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    file_name, problem = _nan_bytes(model)
    code = main(["image-to-3d", "--image", str(_disc_png(tmp_path / "disc.png")), "--model", str(model),
                 "--out", str(tmp_path / "out"), "--steps", "1", "--device", "cpu"])
    line = _error_line(capsys.readouterr().err, "image-to-3d")
    assert code == 2 and file_name in line and problem in line and "mask" not in line, line
    assert not (tmp_path / "out" / "views" / "disc").exists()
