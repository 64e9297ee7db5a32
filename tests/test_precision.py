"""Precision (issue 14): the frozen conditioner computes in float32 whatever the training step's
autocast, so training and sampling see the same condition; half-precision inference upcasts the
float16 SVD VAE to encode, as StableVideoDiffusionPipeline does, and stays close to float32."""
from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from nova3d.config import load_experiment
from nova3d.data.views import MultiViewBatch
from nova3d.models import edm
from nova3d.models.conditioning import Conditioner, build_tiny_components
from nova3d.models.gta import GTAConfig, is_new_parameter
from nova3d.models.svd_configs import tiny_unet_config
from nova3d.pipeline import GTAUNet, Nova3DPipeline
from nova3d.systems.mv_diffusion import MultiViewDiffusion

B, V, RES = 2, 4, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread


def _batch(seed: int = 0) -> MultiViewBatch:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    return MultiViewBatch(
        object_ids=[f"obj{i}" for i in range(B)], input_image=rand(B, 3, RES, RES), rgb=rand(B, V, 3, RES, RES),
        normals=rand(B, V, 3, RES, RES) * 2 - 1, masks=torch.ones(B, V, 1, RES, RES), c2w=torch.eye(4).repeat(B, V, 1, 1),
        K=torch.eye(3).repeat(B, V, 1, 1), azimuth_deg=torch.zeros(B, V), elevation_deg=torch.zeros(B, V),
        view_indices=torch.arange(V).repeat(B, 1), background=torch.ones(B, 3))


@pytest.fixture(scope="module")
def system() -> MultiViewDiffusion:
    cfg = load_experiment("tiny", [f"data.resolution={RES}", f"data.num_views={V}"])
    return MultiViewDiffusion(cfg).eval()


def _pipeline_of(system: MultiViewDiffusion) -> Nova3DPipeline:
    s = system.cfg.system
    c = system.conditioner
    scheduler = EulerDiscreteScheduler.from_config(edm.svd_xt_scheduler_config())
    pipe = Nova3DPipeline(GTAUNet.from_unet(system.unet), c.vae, c.image_encoder, scheduler, None, num_frames=V,
                          resolution=RES, fps=s.fps, motion_bucket_id=s.motion_bucket_id,
                          noise_aug_strength=s.noise_aug_strength)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_training_under_bf16_autocast_and_sampling_see_the_same_condition(system):
    """What Lightning's bf16-mixed does to a training step (autocast) must not reach the conditioner."""
    batch, pipe = _batch(), _pipeline_of(system)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train = system.encode_condition(batch, torch.Generator().manual_seed(5))
        targets = system.target_latents(batch, sample_posterior=False)
    sample = pipe.encode_condition(batch.input_image, torch.Generator().manual_seed(5))
    for name in ("clip_embeds", "latent", "added_time_ids"):
        a, b = getattr(train, name), getattr(sample, name)
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    assert targets.dtype == torch.float32
    assert torch.equal(targets, system.target_latents(batch, sample_posterior=False))  # same as without autocast


def test_autocast_would_change_the_condition_without_the_fp32_guard(system):
    """The test above can fail: the same VAE encode and CLIP under autocast, unguarded, differ."""
    c = system.conditioner
    x = _batch().input_image * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw_latent = c.vae.encode(x).latent_dist.mode()
        raw_clip = c.image_encoder(pixel_values=c.clip_preprocess(x)).image_embeds
    assert raw_latent.dtype == torch.bfloat16 or not torch.equal(raw_latent, c.encode_condition_latent(x, 0.0))
    assert not torch.equal(raw_clip.float(), c.encode_image_clip(x)[:, 0])


def test_float16_vae_with_force_upcast_encodes_in_float32_and_decodes_in_float16():
    image_encoder, vae, fe = build_tiny_components(0)
    ref = Conditioner(image_encoder, vae, fe)
    x = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = ref.encode_condition_latent(x, 0.02, torch.Generator().manual_seed(2))
    half_vae = build_tiny_components(0)[1].half()
    half = Conditioner(image_encoder, half_vae, fe)
    assert half_vae.config.force_upcast and half.vae_needs_upcast
    seen: list[torch.dtype] = []
    hooks = [half_vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(("enc", a[0].dtype))),
             half_vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(("dec", a[0].dtype)))]
    got = half.encode_condition_latent(x, 0.02, torch.Generator().manual_seed(2))
    frames = half.encode_frames(x[:, None], sample=False)
    half.decode_latents(frames)
    for h in hooks:
        h.remove()
    assert seen == [("enc", torch.float32), ("enc", torch.float32), ("dec", torch.float16)]
    assert half_vae.dtype == torch.float16  # restored after encoding
    # Upcasting the float16 weights loses only their rounding: close to the float32 VAE.
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = GTAUNet.build(tiny_unet_config(), GTAConfig())
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if is_new_parameter(name):
                    p.normal_(0, 0.2)
    image_encoder, vae, fe = build_tiny_components(0)
    scheduler = EulerDiscreteScheduler.from_config(edm.svd_xt_scheduler_config())
    path = tmp_path_factory.mktemp("precision_pipe")
    Nova3DPipeline(unet.eval(), vae, image_encoder, scheduler, fe, num_frames=V, resolution=RES).save_pretrained(path)
    return path


def _views(path, dtype: torch.dtype, device: str = "cpu"):
    pipe = Nova3DPipeline.from_pretrained(path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == dtype and pipe.image_encoder.dtype == dtype
    image = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(3))
    out = pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(4), progress=False)
    assert out.rgb.dtype == torch.float32 and torch.isfinite(out.rgb).all() and torch.isfinite(out.normals).all()
    return out


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.06), (torch.float16, 0.02)])
def test_half_precision_pipeline_is_close_to_float32(saved, dtype, atol):
    ref, got = _views(saved, torch.float32), _views(saved, dtype)
    for field in ("rgb", "normals"):
        err = (getattr(got, field) - getattr(ref, field)).abs().mean().item()
        assert err < atol, (field, err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pipeline_on_cuda(saved, dtype):
    ref, got = _views(saved, torch.float32, "cuda"), _views(saved, dtype, "cuda")
    assert (got.rgb - ref.rgb).abs().mean().item() < 0.05
