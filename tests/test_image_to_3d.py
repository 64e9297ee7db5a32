"""`nova3d image-to-3d` (nova3d/image_to_3d.py): generate -> fuse -> export in one command.

End to end on a tiny random pipeline, whose views are noise: the contract is a mesh or the one-line
"generated views kept at ..." error. The fusion stage is also run on a known-good object folder, so
the success path (files moved out of .fusion.partial into OUT) is always exercised."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from helpers_objects import make_object_folder
from nova3d.cli import main
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.image_to_3d import RECORD_FILE, STAGING_DIR, fuse_generated, load_config
from nova3d.models import edm
from nova3d.models.conditioning import build_tiny_components
from nova3d.models.gta import GTAConfig
from nova3d.models.svd_configs import tiny_unet_config
from nova3d.pipeline import GTAUNet, Nova3DPipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FRAMES, RES = 4, 32
TINY_FUSION = ["optim.steps=5", "optim.rays=128", "optim.warmup_steps=2", "field.hashgrid.levels=4",
               "field.hashgrid.log2_table_size=12", "field.hashgrid.max_resolution=64", "render.num_steps=64",
               "render.occupancy.resolution=16", "export.resolution=32", "logging.tensorboard=false",
               "logging.progress=false", "logging.turntable_frames=2"]
FUSION_FILES = ("mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "errors.png", "conflict_maps.png",
                "conflict_maps.npz", "cameras_refined.json", "metrics.json", "config.yaml")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Nova3DPipeline folder (save_pretrained), as tests/test_pipeline.py builds it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = GTAUNet.build(tiny_unet_config(), GTAConfig()).eval()
        image_encoder, vae, feature_extractor = build_tiny_components(0)
    scheduler = EulerDiscreteScheduler.from_config(edm.svd_xt_scheduler_config())
    pipe = Nova3DPipeline(unet, vae, image_encoder, scheduler, feature_extractor, num_frames=FRAMES, resolution=RES)
    path = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(path)
    return path


def _disc_png(path, size=64, radius=20, colour=(40, 120, 220)):
    """A coloured disc on a transparent background."""
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2 + 0.5) ** 2 + (yy - size / 2 + 0.5) ** 2 <= radius**2
    arr = np.zeros((size, size, 4), np.uint8)
    arr[inside] = (*colour, 255)
    PIL.Image.fromarray(arr, "RGBA").save(path)
    return path


def _args(image, model, out, *extra):
    return ["image-to-3d", "--image", str(image), "--model", str(model), "--out", str(out), "--steps", "2",
            "--seed", "1", "--guidance", "1.0", "2.0", "--device", "cpu", *extra]


def _error_line(err: str, command: str = "image-to-3d") -> str:
    """The one error line; progress bars may come before it on stderr, nothing after it."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"nova3d {command}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def _check_mesh_out(out):
    for name in FUSION_FILES:
        assert (out / name).is_file(), name
    assert not (out / STAGING_DIR).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experiment"] == "fusion/default" and metrics["steps"] == 5
    assert metrics["faces"] > 0 and metrics["vertices"] > 0 and np.isfinite(metrics["psnr_mesh_vs_views"])
    return metrics


def test_end_to_end_gives_a_mesh_or_keeps_the_views(model, tmp_path, capsys):
    image, out = _disc_png(tmp_path / "blue disc.png"), tmp_path / "out"
    code = main(_args(image, model, out, *TINY_FUSION))
    captured = capsys.readouterr()
    views = out / "views" / "blue_disc"
    # Either way the generated views are a complete object folder of the pipeline's orbit.
    assert schema.missing_files(views) == [] and len(list((views / schema.RGB_DIR).glob("*.png"))) == FRAMES
    assert "[1/2]" in captured.out and "[2/2]" in captured.out
    if code == 0:
        _check_mesh_out(out)
        record = json.loads((out / RECORD_FILE).read_text())
        assert record["views"] == "views/blue_disc" and record["generate"]["steps"] == 2
        for name in ("mesh.glb", "turntable.gif", "conflict_maps.png"):
            assert str(out / name) in captured.out
    else:  # random weights: the views may have no usable masks
        assert code == 2
        line = _error_line(captured.err)
        assert f"generated views kept at {views}" in line
        assert not list(out.glob("mesh.*")) and not (out / "metrics.json").exists()
        assert not (out / STAGING_DIR).exists()
    # A second run into the same OUT refuses before loading anything.
    assert main(_args(image, model, out, *TINY_FUSION)) == 2
    assert "choose another --out" in _error_line(capsys.readouterr().err)


def test_fusion_failure_after_generating_is_one_line_and_keeps_the_views(model, tmp_path, capsys):
    # A real fusion error on real generated views: fitting at 64² needs views of at least 64².
    image, out = _disc_png(tmp_path / "disc.png"), tmp_path / "out"
    assert main(_args(image, model, out, *TINY_FUSION, "optim.fit_resolution=64")) == 2
    line = _error_line(capsys.readouterr().err)
    views = out / "views" / "disc"
    assert "fusion failed" in line and "64" in line and f"generated views kept at {views} for inspection" in line
    assert schema.missing_files(views) == [] and sorted(p.name for p in out.iterdir()) == ["views"]


def test_fuse_stage_on_good_views_moves_a_mesh_into_out(tmp_path):
    views = make_object_folder(tmp_path / "out" / "views", "ellipsoid", views=4, res=24)
    out = tmp_path / "out"
    (out / STAGING_DIR).mkdir()  # left over from an interrupted run: replaced
    result = fuse_generated(views, out, load_config("fusion/default", TINY_FUSION, device="cpu"))
    metrics = _check_mesh_out(out)
    assert result.out_dir == out and result.meshes == {f: out / f"mesh.{f}" for f in ("glb", "obj", "ply")}
    assert result.metrics == metrics and metrics["device"] == "cpu"
    assert schema.missing_files(views) == []  # the views stay where they were


def test_fuse_stage_failure_is_one_line_and_keeps_the_views(tmp_path):
    views = make_object_folder(tmp_path / "out" / "views", "obj", views=4, res=24)
    PIL.Image.new("L", (24, 24), 0).save(views / "mask" / "002.png")  # as a bad model would: nothing there
    out = tmp_path / "out"
    with pytest.raises(Nova3DError) as info:
        fuse_generated(views, out, load_config("fusion/default", TINY_FUSION, device="cpu"))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "empty masks" in message
    assert f"generated views kept at {views}" in message
    assert sorted(p.name for p in out.iterdir()) == ["views"]  # nothing of fusion left behind


@pytest.mark.parametrize("case", ["unreadable_image", "empty_image", "missing_model", "not_a_model",
                                  "bad_override", "taken_out"])
def test_bad_input_fails_before_generating(case, model, tmp_path, capsys):
    image, out, extra = _disc_png(tmp_path / "input.png"), tmp_path / "out", list(TINY_FUSION)
    expect = {"unreadable_image": "input.png", "empty_image": "input.png", "missing_model": "no_such_model",
              "not_a_model": "model_index.json", "bad_override": "optim.stepz", "taken_out": "notes.txt"}[case]
    if case == "unreadable_image":
        image.write_bytes(b"\x89PNG garbage")
    elif case == "empty_image":
        PIL.Image.new("RGBA", (64, 64)).save(image)
    elif case == "missing_model":
        model = tmp_path / "no_such_model"
    elif case == "not_a_model":
        model = tmp_path / "empty_model"
        model.mkdir()
    elif case == "bad_override":
        extra.append("optim.stepz=3")
    elif case == "taken_out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert main(_args(image, model, out, *extra)) == 2
    assert expect in _error_line(capsys.readouterr().err)
    assert (sorted(p.name for p in out.iterdir()) == ["notes.txt"]) if case == "taken_out" else not out.exists()
