"""Nova3DPipeline, preprocessing and `nova3d generate` on a tiny random pipeline (CPU seconds).

The pipeline is checked against StableVideoDiffusionPipeline (single domain: same latents),
against edm.sample with two separate CFG passes (two domains: batched CFG keeps the GTA pairing),
and through a save_pretrained -> from_pretrained round trip with non-zero GTA weights.
"""
from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

from nova3d.cameras import Cameras, orbit_cameras, OrbitSpec
from nova3d.cli import main
from nova3d.data import schema
from nova3d.data.shards import read_object_folder
from nova3d.errors import Nova3DError
from nova3d.models import conditioning as C
from nova3d.models import edm
from nova3d.models.conditioning import build_tiny_components
from nova3d.models.denoiser import unet_forward
from nova3d.models.gta import GTAConfig, install_gta, is_new_parameter
from nova3d.models.svd_configs import tiny_unet_config
from nova3d.pipeline import GTAUNet, Nova3DPipeline, normal_coverage, rgb_coverage
from nova3d.preprocess import prepare_image, training_fill

FRAMES, RES, STEPS = 4, 32, 2  # tiny VAE: 16² latents


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(edm.svd_xt_scheduler_config())


def _tiny_pipeline(unet, seed: int = 0) -> Nova3DPipeline:
    image_encoder, vae, feature_extractor = build_tiny_components(seed)
    pipe = Nova3DPipeline(unet, vae, image_encoder, _scheduler(), feature_extractor, num_frames=FRAMES, resolution=RES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> Nova3DPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = GTAUNet.build(tiny_unet_config(), GTAConfig())
        with torch.no_grad():  # non-zero GTA weights, so losing or mis-pairing them shows
            for name, p in unet.named_parameters():
                if is_new_parameter(name):
                    p.normal_(0, 0.2)
    return _tiny_pipeline(unet.eval())


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("nova3d_pipe")
    pipe.save_pretrained(path)
    return path


def _image(seed: int = 0, size: int = RES) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(p: Nova3DPipeline, seed: int = 0, **kwargs):
    return p(_image(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


# ---------------------------------------------------------------- save / load


def test_gta_weights_survive_save_and_load(pipe, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["unet"] == ["nova3d.pipeline", "GTAUNet"]
    assert GTAConfig.from_dict(index["gta"]) == pipe.unet.gta_config
    assert index["num_frames"] == FRAMES and index["resolution"] == RES and index["fov_deg"] == 49.1
    assert (saved / "unet" / GTAUNet.WEIGHTS_NAME).is_file()

    loaded = Nova3DPipeline.from_pretrained(saved)
    assert isinstance(loaded.unet, GTAUNet) and loaded.unet.gta_config == pipe.unet.gta_config
    for name in ("unet", "vae", "image_encoder"):
        ref, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys(), name
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    gta = {k: v for k, v in loaded.unet.state_dict().items() if is_new_parameter(k)}
    assert gta and all(v.abs().sum() > 0 for v in gta.values())
    # diffusers' plain loader refuses the folder rather than silently dropping the gta_* weights.
    with pytest.raises(OSError):
        UNetSpatioTemporalConditionModel.from_pretrained(saved / "unet")


def test_round_trip_gives_the_same_views(pipe, saved, tmp_path):
    loaded = Nova3DPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    # Given the same condition, UNet sampling and VAE decoding are bit-identical after the round trip.
    cond = loaded.encode_condition(_image(), torch.Generator().manual_seed(0))
    z = [p.sample_latents(cond, FRAMES, STEPS, 3.0, torch.Generator().manual_seed(1), progress=False)
         for p in (pipe, loaded)]
    assert torch.equal(z[0], z[1])
    assert torch.equal(pipe.decode(z[0]).normals, loaded.decode(z[1]).normals)
    # End to end: transformers mmaps the loaded CLIP weights at another alignment, so BLAS may sum
    # in another order (~1e-7 on the embedding, grown by the random tiny UNet) ...
    ref, got = _run(pipe), _run(loaded)
    for field in ("rgb", "normals", "masks"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=0, atol=2e-3)
    # ... while loaded -> saved -> loaded is bit-exact end to end.
    loaded.save_pretrained(tmp_path)
    again = Nova3DPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    out = _run(again)
    assert torch.equal(out.rgb, got.rgb) and torch.equal(out.normals, got.normals)


# ---------------------------------------------------------------- sampling


def test_single_domain_reproduces_stable_video_diffusion():
    """Conditioning, time ids, noise draws, σ schedule and guidance are SVD's own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = UNetSpatioTemporalConditionModel.from_config(tiny_unet_config()).eval()
    install_gta(unet, GTAConfig(num_domains=1))
    ours = _tiny_pipeline(unet, seed=1)
    image_encoder, vae, feature_extractor = build_tiny_components(1)
    svd = StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet, scheduler=_scheduler(),
                                       feature_extractor=feature_extractor)
    svd.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray((_image(3)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    ref = svd(image, height=RES, width=RES, num_frames=FRAMES, num_inference_steps=3, min_guidance_scale=1.0,
              max_guidance_scale=3.0, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    gen = torch.Generator().manual_seed(7)
    cond = ours.encode_condition(ours.image_tensor(image), gen)
    got = ours.sample_latents(cond, FRAMES, 3, edm.guidance_schedule("linear", FRAMES, 1.0, 3.0), gen, progress=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_batched_guidance_keeps_domain_pairing(pipe):
    """One [D, (uncond, cond), B] forward == edm.sample's separate cond/uncond [D*B] passes."""
    images = torch.cat([_image(0), _image(1)])  # B = 2 objects: a wrong row order would mix them
    guidance = edm.guidance_schedule("triangle", FRAMES, 1.0, 3.0)
    cond = pipe.encode_condition(images, torch.Generator().manual_seed(0))
    got = pipe.sample_latents(cond, FRAMES, 3, guidance, torch.Generator().manual_seed(5), progress=False)

    uncond = cond.unconditional()

    def denoiser(x, sigma, use_cond):
        fn = lambda x_in, c_noise: unet_forward(pipe.unet, x_in, c_noise, cond if use_cond else uncond, 2)  # noqa: E731
        return edm.denoise(fn, x, sigma)

    ref = edm.sample(denoiser, tuple(got.shape), pipe.sigmas(3), guidance, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_outputs_shapes_ranges_and_cameras(pipe, capsys):
    out = _run(pipe, guidance=(1.0, 2.5), guidance_schedule="linear")
    assert out.rgb.shape == (1, FRAMES, 3, RES, RES) and out.masks.shape == (1, FRAMES, 1, RES, RES)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1 and out.masks.min() >= 0 and out.masks.max() <= 1
    torch.testing.assert_close(out.normals.norm(dim=2), torch.ones(1, FRAMES, RES, RES))
    ref = orbit_cameras(OrbitSpec(num_views=FRAMES, resolution=RES))
    assert out.cameras.normal_frame == "input_view" and torch.equal(out.cameras.c2w, ref.c2w)
    pil = _run(pipe, output_type="pil")
    assert len(pil.rgb) == 1 and len(pil.rgb[0]) == FRAMES and pil.rgb[0][0].size == (RES, RES)
    assert pil.normals[0][0].mode == "RGB" and pil.masks[0][0].mode == "L"
    capsys.readouterr()
    pipe.set_progress_bar_config()  # default: the bar shows unless progress=False
    try:
        pipe(_image(), num_inference_steps=1, progress=True)
        assert "denoising" in capsys.readouterr().err
        pipe(_image(), num_inference_steps=1, progress=False)
        assert "denoising" not in capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config(disable=True)


def test_mask_rules():
    unit = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)
    assert torch.allclose(normal_coverage(unit), torch.ones(2, 1, 4, 4))
    assert torch.allclose(normal_coverage(torch.ones(2, 3, 4, 4)), torch.zeros(2, 1, 4, 4))  # white background
    assert rgb_coverage(torch.ones(1, 3, 2, 2)).max() == 0 and rgb_coverage(torch.zeros(1, 3, 2, 2)).min() == 1


# ---------------------------------------------------------------- preprocessing


def _rgba_png(path, size=96, box=(10, 20, 40, 80), alpha=255, colour=(200, 30, 30)):
    """An RGBA PNG with an opaque rectangle box=(left, top, right, bottom) on a transparent ground."""
    arr = np.zeros((size, size, 4), np.uint8)
    left, top, right, bottom = box
    arr[top:bottom, left:right] = (*colour, alpha)
    PIL.Image.fromarray(arr, "RGBA").save(path)
    return path


def test_training_fill_comes_from_the_cameras():
    assert training_fill() == pytest.approx(1 / (2 * 1.5 * math.tan(math.radians(49.1 / 2))), rel=1e-4)
    assert training_fill(radius=3.0) == pytest.approx(training_fill() / 2, rel=1e-4)


def test_prepare_rgba_frames_and_centres_the_object(tmp_path):
    prepared = prepare_image(_rgba_png(tmp_path / "obj.png"), size=64)
    assert prepared.bbox == (10, 20, 40, 80) and not prepared.background_removed
    rows, cols = np.nonzero(prepared.alpha > 0.5)
    assert rows.max() + 1 - rows.min() == pytest.approx(prepared.fill * 64, abs=1.5)  # longest side: height
    assert (rows.min() + rows.max() + 1) / 2 == pytest.approx(32, abs=1) and (cols.min() + cols.max() + 1) / 2 == pytest.approx(32, abs=1)
    arr = np.asarray(prepared.image)
    assert prepared.image.size == (64, 64) and (arr[0, 0] == 255).all()  # white background
    assert tuple(arr[32, 32]) == (200, 30, 30)


def test_prepare_rgb_on_uniform_background(tmp_path):
    arr = np.full((80, 80, 3), 240, np.uint8)
    arr[30:50, 25:60] = (20, 90, 160)
    PIL.Image.fromarray(arr, "RGB").save(tmp_path / "rgb.jpg", quality=95)
    prepared = prepare_image(tmp_path / "rgb.jpg", size=64)
    assert prepared.background_removed
    left, top, right, bottom = prepared.bbox
    assert abs(left - 25) <= 1 and abs(top - 30) <= 1 and abs(right - 60) <= 1 and abs(bottom - 50) <= 1


def test_prepare_errors(tmp_path):
    noisy = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    PIL.Image.fromarray(noisy, "RGB").save(tmp_path / "noisy.png")
    with pytest.raises(Nova3DError, match="RGBA"):
        prepare_image(tmp_path / "noisy.png")
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(Nova3DError, match="broken.png"):
        prepare_image(tmp_path / "broken.png")
    with pytest.raises(Nova3DError, match="empty"):
        prepare_image(_rgba_png(tmp_path / "empty.png", alpha=0, box=(0, 0, 1, 1)))
    with pytest.raises(Nova3DError, match="64"):
        prepare_image(_rgba_png(tmp_path / "small.png", size=48, box=(5, 5, 20, 20)))


# ---------------------------------------------------------------- nova3d generate


def test_generate_writes_an_object_folder(saved, tmp_path, capsys):
    image = _rgba_png(tmp_path / "red box.png", size=64, box=(12, 8, 44, 56))
    args = ["generate", "--image", str(image), "--model", str(saved), "--out", str(tmp_path / "gen"),
            "--steps", "2", "--seed", "3", "--guidance", "1.0", "2.0", "--device", "cpu"]
    assert main(args) == 0
    folder = tmp_path / "gen" / "red_box"
    assert str(folder) in capsys.readouterr().out
    assert schema.missing_files(folder) == [] and not (tmp_path / "gen" / "red_box.partial").exists()
    cameras = Cameras.load(folder / schema.CAMERAS_FILE)
    assert len(cameras) == FRAMES and cameras.normal_frame == "input_view" and cameras.width == RES
    sample = read_object_folder(folder)  # the training reader accepts it: dtypes, channels, sizes
    assert sample.normal.dtype == np.uint16 and sample.rgba.shape == (FRAMES, 4, RES, RES)
    meta = schema.ObjectMeta.load(folder / schema.META_FILE)
    assert meta.source == f"generated:{saved.resolve()}" and meta.settings["seed"] == 3
    # Running again does not overwrite the folder.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unreadable", "empty_alpha", "missing_model"])
def test_generate_bad_input_is_one_error_line(case, saved, tmp_path, capsys):
    image, model = tmp_path / "input.png", saved
    if case == "unreadable":
        image.write_bytes(b"\x89PNG garbage")
    else:
        _rgba_png(image, size=64, alpha=0 if case == "empty_alpha" else 255)
    if case == "missing_model":
        model = tmp_path / "no_such_model"
    code = main(["generate", "--image", str(image), "--model", str(model), "--out", str(tmp_path / "gen"),
                 "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("nova3d generate: error:")
    assert (str(model) if case == "missing_model" else "input.png") in err
    assert not (tmp_path / "gen" / "input").exists()


# ---------------------------------------------------------------- decoding in chunks (issue 14)


def _decode_calls(monkeypatch) -> list[int]:
    """Frames per VAE decode call, recorded."""
    calls: list[int] = []
    real = C.decode_frames

    def spy(vae, z, num_frames):
        calls.append(z.shape[0])
        assert z.shape[0] == num_frames  # one video's chunk per call, never frames of two videos
        return real(vae, z, num_frames)

    monkeypatch.setattr(C, "decode_frames", spy)
    return calls


def test_decode_is_per_video_and_covers_the_orbit_by_default(pipe, monkeypatch):
    z = torch.randn(2 * 2, FRAMES, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(7))  # D=2, B=2
    calls = _decode_calls(monkeypatch)
    whole = pipe.decode(z)
    assert calls == [FRAMES] * 4  # one call per video, the whole orbit at once
    # Per video == the videos decoded one by one (B does not change what a video decodes to).
    for v in range(4):
        alone = pipe.decode(z[v : v + 1].repeat(2, 1, 1, 1, 1))  # one object, both domains the same video
        d, b = divmod(v, 2)
        ref = alone.rgb[0] if d == 0 else alone.normals[0]
        got = whole.rgb[b] if d == 0 else whole.normals[b]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    calls.clear()
    chunked = pipe.decode(z, decode_chunk_size=3)
    assert calls == [3, 1] * 4
    # A chunk covering the orbit is the one-shot decode, exactly.
    calls.clear()
    covered = pipe.decode(z, decode_chunk_size=FRAMES)
    assert calls == [FRAMES] * 4 and torch.equal(covered.rgb, whole.rgb) and torch.equal(covered.normals, whole.normals)
    # The temporal decoder mixes frames, so shorter chunks do change the views (why the default covers the orbit).
    assert not torch.allclose(chunked.rgb, whole.rgb, atol=1e-4)
    with pytest.raises(ValueError, match="decode_chunk_size"):
        pipe.decode(z, decode_chunk_size=0)


def test_per_image_vae_chunks_decode_exactly_as_one_shot():
    """A per-image VAE (the toy recipe's AutoencoderKL): chunking changes nothing but memory."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1).eval()
    image_encoder, _, _ = build_tiny_components(0)
    cond = C.Conditioner(image_encoder, vae)
    z = torch.randn(2, 5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cond.decode_latents(z, 2), cond.decode_latents(z), rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float8"], "--dtype must be one of"),
    (["--decode-chunk-size", "0"], "--decode-chunk-size must be >= 1"),
])
def test_generate_bad_precision_options_are_one_error_line(args, message, saved, tmp_path, capsys):
    image = _rgba_png(tmp_path / "input.png", size=64)
    code = main(["generate", "--image", str(image), "--model", str(saved), "--out", str(tmp_path / "gen"),
                 "--steps", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err


def test_generate_in_bfloat16_writes_an_object_folder(saved, tmp_path, capsys):
    image = _rgba_png(tmp_path / "box.png", size=64, box=(12, 8, 44, 56))
    args = ["generate", "--image", str(image), "--model", str(saved), "--out", str(tmp_path / "gen"),
            "--steps", "2", "--device", "cpu", "--dtype", "bfloat16", "--decode-chunk-size", "2"]
    assert main(args) == 0
    meta = schema.ObjectMeta.load(tmp_path / "gen" / "box" / schema.META_FILE)
    assert meta.settings["dtype"] == "bfloat16" and meta.settings["decode_chunk_size"] == 2
