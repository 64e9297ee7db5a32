"""The image-prior backbone through the shared sampling path (issue 15 §1): the export's pipeline
builder, save_pretrained -> from_pretrained, batched CFG pairing and `nova3d generate`, on a tiny
random image-prior system (CPU seconds)."""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from nova3d.cli import main
from nova3d.config import load_experiment
from nova3d.data import schema
from nova3d.data.shards import read_object_folder
from nova3d.export import build_pipeline
from nova3d.models import edm
from nova3d.models.denoiser import unet_forward
from nova3d.models.gta import is_new_parameter
from nova3d.models.image_unet import GTAImageUNet
from nova3d.pipeline import Nova3DPipeline
from nova3d.systems.mv_diffusion import MultiViewDiffusion

FRAMES, RES, STEPS = 4, 32, 2  # tiny VAE: 16² latents


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread


@pytest.fixture(scope="module")
def pipe() -> Nova3DPipeline:
    cfg = load_experiment("tiny", ["model.backbone=sd_image", f"data.num_views={FRAMES}", f"data.resolution={RES}"])
    system = MultiViewDiffusion(cfg).eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # non-zero new weights, so losing them shows
        torch.manual_seed(0)
        for name, p in system.unet.named_parameters():
            if is_new_parameter(name):
                p.normal_(0, 0.2)
    pipeline = build_pipeline(system)  # what `nova3d export` writes
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("image_prior_pipe")
    pipe.save_pretrained(path)
    return path


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(seed))


def test_image_prior_pipeline_saves_and_loads(pipe, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["unet"] == ["nova3d.models.image_unet", "GTAImageUNet"]
    loaded = Nova3DPipeline.from_pretrained(saved)
    assert isinstance(loaded.unet, GTAImageUNet)
    assert loaded.unet.gta_config == pipe.unet.gta_config and loaded.unet.mv_config == pipe.unet.mv_config
    ref, got = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    loaded.set_progress_bar_config(disable=True)
    cond = loaded.encode_condition(_image(), torch.Generator().manual_seed(0))
    z = [p.sample_latents(cond, FRAMES, STEPS, 3.0, torch.Generator().manual_seed(1), progress=False)
         for p in (pipe, loaded)]
    assert torch.equal(z[0], z[1])


def test_batched_guidance_keeps_domain_pairing(pipe):
    """One [D, (uncond, cond), B] forward == edm.sample's separate cond/uncond [D*B] passes."""
    images = torch.cat([_image(0), _image(1)])
    guidance = edm.guidance_schedule("triangle", FRAMES, 1.0, 3.0)
    cond = pipe.encode_condition(images, torch.Generator().manual_seed(0))
    got = pipe.sample_latents(cond, FRAMES, 3, guidance, torch.Generator().manual_seed(5), progress=False)
    uncond = cond.unconditional()

    def denoiser(x, sigma, use_cond):
        fn = lambda x_in, c_noise: unet_forward(pipe.unet, x_in, c_noise, cond if use_cond else uncond, 2)  # noqa: E731
        return edm.denoise(fn, x, sigma)

    ref = edm.sample(denoiser, tuple(got.shape), pipe.sigmas(3), guidance, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_generate_with_an_image_prior_pipeline(saved, tmp_path, capsys):
    image = tmp_path / "box.png"
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[12:52, 16:48] = (200, 30, 30, 255)
    PIL.Image.fromarray(rgba, "RGBA").save(image)
    args = ["generate", "--image", str(image), "--model", str(saved), "--out", str(tmp_path / "gen"),
            "--steps", str(STEPS), "--seed", "3", "--device", "cpu"]
    assert main(args) == 0
    folder = tmp_path / "gen" / "box"
    assert str(folder) in capsys.readouterr().out
    assert schema.missing_files(folder) == []
    sample = read_object_folder(folder)
    assert sample.rgba.shape == (FRAMES, 4, RES, RES) and sample.normal.dtype == np.uint16
