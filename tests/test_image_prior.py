"""The image-prior backbone (issue 15 §1): a diffusers UNet2DConditionModel with multi-view attention
and the same GTA processors. Zero-init equivalence with the pretrained image UNet, SD 2.1 /
sd-image-variations key compatibility on the meta device, gradients, coupling across views and
domains, save/load, the factory, and a training loss through the shared EDM path. Tiny random
models on CPU; every random draw uses a local generator or a forked RNG."""
from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from nova3d.config import ModelConfig
from nova3d.errors import Nova3DError
from nova3d.models import edm
from nova3d.models.conditioning import build_tiny_components
from nova3d.models.denoiser import ImageCondition, unet_forward
from nova3d.models.factory import BACKBONES, IMAGE_ARCHITECTURES, build_components
from nova3d.models.gta import GTAConfig, GTAProcessorReplaced, is_new_parameter, split_domains, split_parameters
from nova3d.models.image_configs import sd21_unet_config, sd_image_variations_unet_config, tiny_image_unet_config
from nova3d.models.image_unet import GTAImageUNet, install_image_gta, sigma_to_sd_timestep
from nova3d.models.multiview import MultiViewConfig, multiview_processors
from nova3d.models.unet import load_gta_weights, save_gta_weights
from tests.helpers_models import seeded

VARIANTS = {
    "full": (GTAConfig(), MultiViewConfig()),
    "orbit": (GTAConfig(), MultiViewConfig(layout="orbit")),
    "spatial_only": (GTAConfig(temporal=False), MultiViewConfig()),
    "temporal_only": (GTAConfig(spatial=False), MultiViewConfig()),
    "no_gta": (GTAConfig(spatial=False, temporal=False), MultiViewConfig()),
    "rgb_only": (GTAConfig(num_domains=1), MultiViewConfig()),
    "all_domain_keys": (GTAConfig(keys="all_domains"), MultiViewConfig()),
}
VIEWS, SIZE = 3, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread


def _vanilla() -> UNet2DConditionModel:
    return seeded(lambda: UNet2DConditionModel.from_config(tiny_image_unet_config()))


def _image_unet(variant: str = "full") -> GTAImageUNet:
    gta, mv = VARIANTS[variant]
    return seeded(lambda: GTAImageUNet.build(tiny_image_unet_config(), gta, mv))


def _inputs(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """GTA-UNet kwargs for `rows` = D*B videos (domain-major): noisy latents + condition latent."""
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(rows, VIEWS, 8, SIZE, SIZE, generator=g),
            "timestep": torch.full((rows,), 0.3),
            "encoder_hidden_states": torch.randn(rows, 1, 32, generator=g)}


def _run(unet, inputs) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def _randomize_new(unet, only: str | None = None, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if is_new_parameter(name) and (only is None or only in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_init_reproduces_the_pretrained_image_unet(variant):
    """Every view through the plain image UNet (SD timestep, condition channels dropped) == the GTA image UNet."""
    vanilla, unet = _vanilla(), _image_unet(variant)
    rows = VARIANTS[variant][0].num_domains * 2
    inputs = _inputs(rows)
    x, c_noise = inputs["sample"], inputs["timestep"]
    t = sigma_to_sd_timestep(torch.exp(4 * c_noise)).repeat_interleave(VIEWS)
    with torch.no_grad():
        ref = vanilla(x[:, :, :4].flatten(0, 1), t, inputs["encoder_hidden_states"].repeat_interleave(VIEWS, 0)).sample
        got = _run(unet, inputs)
    assert got.shape == (rows, VIEWS, 4, SIZE, SIZE)
    assert (got - ref.unflatten(0, (rows, VIEWS))).abs().max() <= 1e-5
    # ... and the new weights do change it once they are non-zero (the comparison can fail).
    _randomize_new(unet)
    with torch.no_grad():
        assert (_run(unet, inputs) - ref.unflatten(0, (rows, VIEWS))).abs().max() > 1e-3


def test_sd_timesteps_match_diffusers_euler_scheduler():
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    log_sigmas = torch.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).numpy()
    sigmas = torch.tensor([0.03, 0.1, 0.7, 1.0, 3.0, 14.0])
    expected = torch.tensor([float(scheduler._sigma_to_t(s.numpy(), log_sigmas)) for s in sigmas])
    torch.testing.assert_close(sigma_to_sd_timestep(sigmas), expected, rtol=0, atol=2e-3)
    ends = sigma_to_sd_timestep(torch.tensor([1e-4, 700.0]))  # beyond SD's range: clamped to its ends
    assert ends[0] == 0 and ends[1] == 999


@pytest.mark.parametrize("config,blocks", [(sd21_unet_config, 16), (sd_image_variations_unet_config, 16)])
def test_real_configs_load_every_pretrained_key_on_meta(config, blocks):
    with torch.device("meta"):
        vanilla = UNet2DConditionModel.from_config(config())
        unet = GTAImageUNet.build(config(), GTAConfig(), MultiViewConfig())
    ref = {k: v.shape for k, v in vanilla.state_dict().items()}
    got = {k: v.shape for k, v in unet.state_dict().items()}
    assert all(got.get(k) == shape for k, shape in ref.items())  # every pretrained key, same shape
    extra = set(got) - set(ref)
    assert extra and all(is_new_parameter(k) for k in extra) and not any(is_new_parameter(k) for k in ref)
    missing, unexpected = unet.load_state_dict(vanilla.state_dict(), strict=False, assign=True)
    assert set(missing) == extra and not unexpected
    assert len(multiview_processors(unet)) == blocks  # SD: 6 down + 1 mid + 9 up transformer blocks
    assert unet.latent_in_channels == 8 and unet.config.in_channels == 4
    assert len(split_parameters(unet)[0]) == len(list(vanilla.parameters()))


def test_real_architectures_fit_their_conditioners():
    from nova3d.models.factory import sd_image_variations_clip_config, svd_xt_clip_config

    from nova3d.models.conditioning import tiny_clip_vision_config

    clips = {"sd21": svd_xt_clip_config(), "sd_image_variations": sd_image_variations_clip_config(),
             "tiny": tiny_clip_vision_config(), "toy": tiny_clip_vision_config()}  # the toy CLIP: the tiny one's width
    assert clips.keys() == IMAGE_ARCHITECTURES.keys()
    for name, clip in clips.items():
        config = IMAGE_ARCHITECTURES[name].unet_config()
        assert config["cross_attention_dim"] == clip["projection_dim"] and config["in_channels"] == 4, name
    assert set(BACKBONES) == {"svd", "sd_image"}


@pytest.mark.parametrize("variant", ["full", "orbit", "no_gta"])
def test_gradients_reach_the_new_modules(variant):
    unet = _image_unet(variant)
    inputs = _inputs(rows=4)
    weight = torch.randn(_run(unet, inputs).shape, generator=torch.Generator().manual_seed(3))

    def grads():
        unet.zero_grad(set_to_none=True)
        (_run(unet, inputs) * weight).sum().backward()
        return {n: p.grad for n, p in unet.named_parameters() if is_new_parameter(n)}

    # At zero init: every output projection, the condition conv and both embeddings.
    g0 = grads()
    for name, grad in g0.items():
        if any(key in name for key in ("to_out", "gta_cond_in", "domain_embedding", "view_embedding")):
            assert grad is not None and grad.abs().sum() > 0, name
    # Once the outputs are non-zero, the Q/K/V and frame embeddings behind them too.
    _randomize_new(unet, only="to_out")
    g1 = grads()
    assert any("gta_mv_attn.to_q" in n for n in g1)
    assert any("gta_frame_embed" in n for n in g1) == (variant != "no_gta")
    for name, grad in g1.items():
        assert grad is not None and grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    """Blocks recomputed in backward see the view count of their forward pass (ViewCheckpoint)."""
    unet = _image_unet("full")
    _randomize_new(unet)
    inputs = _inputs(rows=2)

    def step():
        unet.zero_grad(set_to_none=True)
        out = _run(unet, inputs)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    out_ref, g_ref = step()
    unet.enable_gradient_checkpointing()
    out_ckpt, g_ckpt = step()
    assert unet.is_gradient_checkpointing and g_ref.keys() == g_ckpt.keys()
    assert torch.allclose(out_ref, out_ckpt, atol=1e-6)
    assert all(torch.allclose(g_ref[n], g_ckpt[n], atol=1e-6) for n in g_ref)


@pytest.mark.parametrize("variant", ["full", "orbit"])
def test_views_and_domains_meet_only_within_one_object(variant):
    unet = _image_unet(variant)
    _randomize_new(unet)
    inputs = _inputs(rows=4)  # D=2 domains x B=2 objects
    poked = inputs["sample"].clone()
    poked[3, 2] += torch.randn(poked[3, 2].shape, generator=torch.Generator().manual_seed(5))  # normals, obj 1, view 2
    with torch.no_grad():
        before = split_domains(_run(unet, inputs), 2)
        after = split_domains(_run(unet, {**inputs, "sample": poked}), 2)
    assert (before[1, 1, 0] - after[1, 1, 0]).abs().max() > 1e-4  # its other views (multi-view attention)
    assert (before[0, 1, 0] - after[0, 1, 0]).abs().max() > 1e-4  # its RGB (GTA)
    assert (before[:, 0] - after[:, 0]).abs().max() <= 1e-6  # the other object is untouched


def test_without_gta_the_domains_stay_independent():
    unet = _image_unet("no_gta")
    _randomize_new(unet)
    inputs = _inputs(rows=4)
    poked = inputs["sample"].clone()
    poked[2:] += 1.0  # all normals
    with torch.no_grad():
        before, after = _run(unet, inputs), _run(unet, {**inputs, "sample": poked})
    assert (before[:2] - after[:2]).abs().max() <= 1e-6
    assert (before[2:] - after[2:]).abs().max() > 1e-4


def test_view_embedding_tells_identical_views_apart():
    unet = _image_unet("full")
    inputs = _inputs(rows=2)
    inputs["sample"] = inputs["sample"][:, :1].expand(-1, VIEWS, -1, -1, -1).contiguous()  # every view the same
    with torch.no_grad():
        same = _run(unet, inputs)
        _randomize_new(unet, only="gta_view_embedding")
        told = _run(unet, inputs)
    assert (same[:, 1] - same[:, 0]).abs().max() <= 1e-5
    assert (told[:, 1] - told[:, 0]).abs().max() > 1e-4


def test_save_load_round_trip_and_layout_check(tmp_path):
    unet = _image_unet("full")
    _randomize_new(unet)
    unet.save_pretrained(tmp_path)
    loaded = GTAImageUNet.from_pretrained(tmp_path)
    assert loaded.gta_config == unet.gta_config and loaded.mv_config == unet.mv_config
    ref, got = unet.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    inputs = _inputs(rows=4)
    with torch.no_grad():
        assert torch.equal(_run(unet.eval(), inputs), _run(loaded, inputs))
    # Same shapes, other layout: refused rather than loaded silently.
    save_gta_weights(unet, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="multi-view"):
        load_gta_weights(_image_unet("orbit"), tmp_path / "w.safetensors")


def test_replacing_the_multiview_processor_is_an_error():
    unet = _image_unet("full")
    with pytest.raises(GTAProcessorReplaced):
        unet.set_attn_processor(AttnProcessor2_0())
    assert len(multiview_processors(unet)) == 4  # tiny UNet: 1 down + 1 mid + 2 up transformer blocks, kept
    name = next(iter(multiview_processors(unet)))
    with pytest.raises(GTAProcessorReplaced):
        dict(unet.named_modules())[name.removesuffix(".processor")].set_processor(AttnProcessor2_0())


def test_factory_builds_and_loads_the_image_backbone(tmp_path):
    built = build_components(ModelConfig(backbone="sd_image", architecture="tiny", multiview="orbit"))
    assert isinstance(built.unet, GTAImageUNet) and built.unet.mv_config.layout == "orbit"
    vanilla = _vanilla()
    vanilla.save_pretrained(tmp_path / "unet")
    image_encoder, vae, feature_extractor = build_tiny_components(0)
    for sub, part in (("image_encoder", image_encoder), ("vae", vae), ("feature_extractor", feature_extractor)):
        part.save_pretrained(tmp_path / sub)
    loaded = build_components(ModelConfig(backbone="sd_image", pretrained=str(tmp_path), gta_temporal=False))
    params = dict(loaded.unet.named_parameters())
    for name, p in vanilla.named_parameters():
        torch.testing.assert_close(params[name], p)
    assert loaded.unet.gta_config == GTAConfig(spatial=True, temporal=False)
    with pytest.raises(Nova3DError, match="model.backbone"):
        build_components(ModelConfig(backbone="sdxl"))
    with pytest.raises(Nova3DError, match="svd_xt"):  # an SVD architecture name on the image backbone
        build_components(ModelConfig(backbone="sd_image", architecture="svd_xt"))
    with pytest.raises(Nova3DError, match="model.multiview"):
        build_components(ModelConfig(backbone="sd_image", multiview="sparse"))
    with pytest.raises(Nova3DError, match="sd_image only"):
        build_components(ModelConfig(multiview="orbit"))
    assert build_components(ModelConfig(backbone="sd_image")).unet.mv_config.layout == "dense"  # null: dense


def test_edm_training_loss_reaches_the_new_modules():
    """The shared path: unet_forward -> EDM v-preconditioning -> EDM loss, on the image backbone."""
    unet = _image_unet("full")
    g = torch.Generator().manual_seed(0)
    b = 2
    cond = ImageCondition(torch.randn(b, 1, 32, generator=g), torch.randn(b, 4, SIZE, SIZE, generator=g),
                          torch.zeros(b, 3))
    x0 = torch.randn(2 * b, VIEWS, 4, SIZE, SIZE, generator=g)
    sigma = torch.tensor([0.5, 3.0]).repeat(2)
    noisy = edm.add_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    denoised = edm.denoise(lambda x, c: unet_forward(unet, x, c, cond, 2), noisy, sigma)
    loss = edm.edm_loss(denoised, x0, sigma).mean()
    loss.backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if "gta_cond_in" in n or "gta_mv_attn.to_out" in n}
    assert grads and all(v is not None and v.abs().sum() > 0 for v in grads.values())


def test_install_refuses_twice():
    unet = _image_unet("full")
    with pytest.raises(RuntimeError, match="already installed"):
        install_image_gta(unet, GTAConfig(), MultiViewConfig())


@pytest.mark.parametrize("ablation,parent,knobs", [
    ("ablations/image_prior", "gta_full", {"backbone", "pretrained", "conditioner", "architecture", "multiview"}),
    ("ablations/toy_image_prior", "toy", {"backbone"})])
def test_image_prior_ablations_change_only_the_backbone(ablation, parent, knobs):
    """Same data, trainer, loss, σ, CFG, learning rates and GTA as the video-prior run it is compared with."""
    from nova3d.config import load_experiment

    full, image = load_experiment(parent), load_experiment(ablation)
    assert image.model.backbone == "sd_image" and full.model.backbone == "svd"
    changed = {k for k in vars(full.model) if getattr(full.model, k) != getattr(image.model, k)}
    assert changed == knobs
    for knob in knobs:
        setattr(image.model, knob, getattr(full.model, knob))
    image.name = full.name
    assert image == full
