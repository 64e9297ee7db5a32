"""CLIP + VAE conditioners: loaded from a tiny SVD folder written by the real pipeline, checked against it."""
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from diffusers.utils.torch_utils import randn_tensor

from nova3d.errors import Nova3DError
from nova3d.models import conditioning as C
from nova3d.models.edm import svd_xt_scheduler_config
from nova3d.models.svd_configs import tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")

B, F, H, W = 2, 3, 16, 16  # tiny: this CPU is slow and shared


@pytest.fixture(scope="module")
def svd_dir(tmp_path_factory):
    """A tiny SVD repo: StableVideoDiffusionPipeline.save_pretrained gives the official layout."""
    image_encoder, vae, feature_extractor = C.build_tiny_components(seed=0)
    unet_cfg = tiny_unet_config()
    unet_cfg.pop("_class_name")
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=UNetSpatioTemporalConditionModel(**unet_cfg),
        scheduler=EulerDiscreteScheduler.from_config(svd_xt_scheduler_config()), feature_extractor=feature_extractor,
    )
    path = tmp_path_factory.mktemp("tiny_svd")
    pipe.save_pretrained(path)
    return path, pipe


@pytest.fixture(scope="module")
def cond(svd_dir):
    return C.load_conditioning(svd_dir[0])


def _images(seed=0, n=B):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loads_svd_layout_frozen(svd_dir, cond):
    path, pipe = svd_dir
    for sub in ("image_encoder", "vae", "feature_extractor"):
        assert (path / sub).is_dir()
    assert all(not p.requires_grad for p in cond.parameters())
    cond.train()  # Lightning calls this on the whole system
    assert not cond.training and not cond.vae.training and not cond.image_encoder.training
    torch.testing.assert_close(cond.vae.state_dict()["decoder.conv_out.weight"],
                               pipe.vae.state_dict()["decoder.conv_out.weight"])
    assert cond.embed_dim == 32 and cond.latent_channels == 4 and cond.vae_scale_factor == 2
    assert cond.vae.dtype == torch.float32


def test_shapes_and_no_grad(cond):
    x = _images().requires_grad_(True)
    emb = cond.encode_image_clip(x)
    lat = cond.encode_condition_latent(x, 0.02, torch.Generator().manual_seed(0))
    frames = x.detach()[:, None].repeat(1, F, 1, 1, 1)
    target = cond.encode_frames(frames, generator=torch.Generator().manual_seed(0))
    video = cond.decode_latents(target, decode_chunk_size=2)
    assert emb.shape == (B, 1, 32)
    assert lat.shape == (B, 4, H // 2, W // 2)
    assert target.shape == (B, F, 4, H // 2, W // 2)
    assert video.shape == (B, F, 3, H, W) and video.dtype == torch.float32
    assert not any(t.requires_grad for t in (emb, lat, target, video))


def test_clip_embedding_matches_pipeline_encode_image(svd_dir, cond):
    _, pipe = svd_dir
    arr = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    ref = pipe._encode_image(PIL.Image.fromarray(arr), "cpu", 1, False)  # resize path runs for PIL input
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    torch.testing.assert_close(cond.encode_image_clip(x), ref, rtol=1e-5, atol=1e-5)


def test_condition_latent_matches_pipeline(svd_dir, cond):
    _, pipe = svd_dir
    x = _images(1)
    noise = randn_tensor(x.shape, generator=torch.Generator().manual_seed(3))
    ref = pipe._encode_vae_image(x + 0.02 * noise, "cpu", 1, False)  # the pipeline: unscaled mode()
    ours = cond.encode_condition_latent(x, 0.02, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref)
    per_sample = cond.encode_condition_latent(x, torch.tensor([0.0, 0.02]), torch.Generator().manual_seed(3))
    torch.testing.assert_close(per_sample[1], ref[1])
    torch.testing.assert_close(per_sample[0], pipe.vae.encode(x[:1]).latent_dist.mode()[0])


def test_encode_frames_scaling_and_sampling(cond):
    frames = torch.stack([_images(s) for s in range(F)], dim=1)  # [B, F, 3, H, W]
    mode = cond.encode_frames(frames, sample=False, chunk_size=4)
    ref = cond.vae.encode(frames.flatten(0, 1)).latent_dist.mode() * cond.vae.config.scaling_factor
    torch.testing.assert_close(mode, ref.unflatten(0, (B, F)))
    a = cond.encode_frames(frames, generator=torch.Generator().manual_seed(4))
    b = cond.encode_frames(frames, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, mode)


def test_decode_matches_pipeline_and_chunks_per_video(svd_dir, cond):
    _, pipe = svd_dir
    lat = torch.randn(B, F, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(5))
    ours = cond.decode_latents(lat, decode_chunk_size=2)  # chunks of 2 and 1 frames
    for b in range(B):  # the pipeline, one video at a time: [1, C, F, H, W]
        ref = pipe.decode_latents(lat[b : b + 1], num_frames=F, decode_chunk_size=2)
        torch.testing.assert_close(ours[b : b + 1], ref.permute(0, 2, 1, 3, 4))


def test_latent_cache_round_trip():
    lat = torch.randn(F, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 2
    arr = C.latents_to_cache(lat)
    assert arr.dtype == np.float16 and arr.shape == (F, 4, 8, 8) and arr.flags.c_contiguous
    back = C.latents_from_cache(arr)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, lat, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(C.latents_from_bytes(C.latents_to_bytes(lat)), back, rtol=0, atol=0)
    with pytest.raises(ValueError):
        C.latents_to_cache(torch.tensor([1.0, float("inf")]))


def test_missing_folder_is_a_user_error(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(Nova3DError, match="image_encoder"):
        C.load_conditioning(tmp_path)
