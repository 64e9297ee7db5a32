"""EDM maths and sampler, checked against diffusers' EulerDiscreteScheduler as SVD-xt configures it."""
import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from nova3d.models import edm

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 4, 4, 8, 8)  # [B, F, C, h, w]


def _svd_scheduler(num_steps: int) -> EulerDiscreteScheduler:
    sched = EulerDiscreteScheduler.from_config(edm.svd_xt_scheduler_config())
    sched.set_timesteps(num_steps)
    return sched


def _fake_unet(x_in: torch.Tensor, t: torch.Tensor, cond: bool) -> torch.Tensor:
    """A fixed nonlinear "v-prediction" depending on input, timestep and condition."""
    t = torch.as_tensor(t, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    frame = torch.linspace(-1, 1, x_in.shape[1]).view(1, -1, 1, 1, 1)
    return torch.tanh(x_in) * (1 + 0.1 * t) + (0.3 if cond else -0.2) * frame


def test_karras_sigmas_and_timesteps_match_scheduler():
    sched = _svd_scheduler(25)
    ours = edm.karras_sigmas(25)
    assert ours.shape == (26,) and ours[-1] == 0
    torch.testing.assert_close(ours, sched.sigmas, rtol=1e-6, atol=0)
    c_noise = edm.precondition(ours[:-1]).c_noise
    torch.testing.assert_close(c_noise, sched.timesteps, rtol=1e-6, atol=1e-6)
    assert math.isclose(sched.init_noise_sigma.item(), math.sqrt(700.0**2 + 1), rel_tol=1e-6)


def test_one_euler_step_matches_scheduler():
    sched = _svd_scheduler(10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen) * 30
    v = torch.randn(SHAPE, generator=gen)  # fixed fake UNet output
    i = 3
    t = sched.timesteps[i]
    sched.set_begin_index(i)  # step from the middle of the schedule
    sigma = sched.sigmas[i]

    seen = {}

    def model_fn(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return v

    denoised = edm.denoise(model_fn, x, sigma.expand(SHAPE[0]))
    ours = edm.euler_step(x, denoised, sigma.item(), sched.sigmas[i + 1].item())

    scaled = sched.scale_model_input(x, t)
    ref = sched.step(v, t, x)
    torch.testing.assert_close(seen["x_in"], scaled)
    torch.testing.assert_close(seen["c_noise"], t.expand(SHAPE[0]))
    torch.testing.assert_close(denoised, ref.pred_original_sample)
    torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_sampler_matches_pipeline_loop(kind):
    """Our sample() vs the denoising loop of StableVideoDiffusionPipeline, written out."""
    steps = 6
    guidance = edm.guidance_schedule(kind, SHAPE[1], 1.0, 3.0)
    sched = _svd_scheduler(steps)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
    g = guidance.view(1, -1, 1, 1, 1)
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        u, c = inp.chunk(2)
        out_u, out_c = _fake_unet(u, t, False), _fake_unet(c, t, True)
        latents = sched.step(out_u + g * (out_c - out_u), t, latents).prev_sample

    def denoiser(x, sigma, cond):
        return edm.denoise(lambda xi, cn: _fake_unet(xi, cn, cond), x, sigma)

    calls = []
    ours = edm.sample(
        denoiser, SHAPE, edm.karras_sigmas(steps), guidance,
        generator=torch.Generator().manual_seed(1), progress=lambda i, n: calls.append((i, n)),
    )
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)
    assert calls[-1] == (steps, steps) and len(calls) == steps


def test_sampler_skips_unconditional_pass_without_guidance():
    conds = []

    def denoiser(x, sigma, cond):
        conds.append(cond)
        return torch.zeros_like(x)

    edm.sample(denoiser, SHAPE, edm.karras_sigmas(3), guidance=torch.ones(SHAPE[1]))
    assert conds == [True] * 3


def test_oracle_denoiser_recovers_data():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    seen_sigmas = []

    def oracle(x, sigma, cond):
        seen_sigmas.append(sigma[0].item())
        assert sigma.shape == (SHAPE[0],)
        return x0

    out = edm.sample(oracle, SHAPE, edm.karras_sigmas(8), guidance=edm.guidance_schedule("triangle", SHAPE[1]),
                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert seen_sigmas[0] == pytest.approx(700.0)


def test_preconditioning_identities():
    sigma = torch.tensor([0.01, 0.5, 1.0, 7.0, 80.0])
    p = edm.precondition(sigma)
    torch.testing.assert_close(p.c_in**2, p.c_skip)
    torch.testing.assert_close(p.c_skip + p.c_out**2, torch.ones(5))  # EDM with σ_data = 1
    torch.testing.assert_close(edm.loss_weight(sigma), 1 / p.c_out**2)  # λ = 1/c_out²: unit-weight F loss
    torch.testing.assert_close(p.c_noise, 0.25 * sigma.log())

    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 3, 4, 4, generator=gen)
    noise = torch.randn(5, 3, 4, 4, generator=gen)
    x = edm.add_noise(x0, noise, sigma)
    v = edm.v_target(x0, noise, sigma)
    torch.testing.assert_close(edm.denoise(lambda xi, cn: v, x, sigma), x0, rtol=1e-4, atol=1e-4)
    # v in VP terms: α·n − σ_vp·x0 with α = 1/√(1+σ²), σ_vp = σ/√(1+σ²)
    a = (1 + sigma**2).rsqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - sigma.view(-1, 1, 1, 1) * a * x0)


def test_loss_weighting_and_edm_loss():
    sigma = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(edm.loss_weight(sigma), torch.tensor([5.0, 2.0, 1.25]))
    target = torch.zeros(3, 2, 4, 3, 3)
    per_sample = edm.edm_loss(target + 1, target, sigma)
    assert per_sample.shape == (3,)
    torch.testing.assert_close(per_sample, torch.tensor([5.0, 2.0, 1.25]))
    torch.testing.assert_close(edm.edm_loss(target + 2, target, sigma, reduction="mean"), torch.tensor(4 * 8.25 / 3))


def test_guidance_schedules():
    lin = edm.guidance_schedule("linear", 16, 1.0, 3.0)
    assert lin.shape == (16,) and lin[0] == 1.0 and lin[-1] == 3.0
    torch.testing.assert_close(lin, torch.linspace(1.0, 3.0, 16))  # the pipeline's expression
    const = edm.guidance_schedule("constant", 16, 1.0, 2.5)
    assert torch.all(const == 2.5)
    tri = edm.guidance_schedule("triangle", 5, 1.0, 3.0)
    torch.testing.assert_close(tri, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]))
    tri16 = edm.guidance_schedule("triangle", 16, 1.0, 3.0)
    assert tri16[0] == 1.0 and tri16[-1] == pytest.approx(1.0)
    torch.testing.assert_close(tri16, tri16.flip(0))
    assert tri16.argmax() in (7, 8) and tri16.max() < 3.0
    with pytest.raises(ValueError):
        edm.guidance_schedule("cosine", 4)


def test_training_sigma_statistics():
    s = edm.sample_training_sigmas(20000, p_mean=0.7, p_std=1.6, generator=torch.Generator().manual_seed(5))
    assert s.shape == (20000,) and torch.all(s > 0)
    assert s.log().mean().item() == pytest.approx(0.7, abs=0.05)
    assert s.log().std().item() == pytest.approx(1.6, abs=0.05)
    again = edm.sample_training_sigmas(20000, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(s, again)


def test_condition_dropout_masks():
    m = edm.sample_condition_dropout(20000, p_both=0.1, p_clip_only=0.05, p_latent_only=0.05,
                                     generator=torch.Generator().manual_seed(6))
    both = (~m.keep_clip & ~m.keep_latent).float().mean().item()
    clip_only = (~m.keep_clip & m.keep_latent).float().mean().item()
    latent_only = (m.keep_clip & ~m.keep_latent).float().mean().item()
    assert both == pytest.approx(0.1, abs=0.01)
    assert clip_only == pytest.approx(0.05, abs=0.01) and latent_only == pytest.approx(0.05, abs=0.01)
    again = edm.sample_condition_dropout(20000, 0.1, 0.05, 0.05, generator=torch.Generator().manual_seed(6))
    assert torch.equal(m.keep_clip, again.keep_clip) and torch.equal(m.keep_latent, again.keep_latent)

    masks = edm.ConditionDropout(keep_clip=torch.tensor([True, False]), keep_latent=torch.tensor([False, True]))
    clip, lat = edm.apply_condition_dropout(torch.ones(2, 1, 8), torch.ones(2, 4, 3, 3), masks)
    assert clip[0].eq(1).all() and clip[1].eq(0).all() and lat[0].eq(0).all() and lat[1].eq(1).all()
    with pytest.raises(ValueError):
        edm.sample_condition_dropout(4, 0.6, 0.6)


def test_noise_augment():
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(edm.noise_augment(img, 0.0), img)
    a = edm.noise_augment(img, 0.02, torch.Generator().manual_seed(7))
    b = edm.noise_augment(img, 0.02, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, img)
    per = edm.noise_augment(img, torch.tensor([0.0, 0.5]), torch.Generator().manual_seed(7))
    assert torch.equal(per[0], img[0]) and (per[1] - img[1]).std() > 0.3
