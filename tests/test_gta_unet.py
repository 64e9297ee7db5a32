"""GTA-UNet: zero-init equivalence, SVD-xt key compatibility, gradients, cross-domain coupling,
checkpoint round-trips. Tiny random UNet on CPU; every random draw uses a local generator or a
forked RNG, so nothing global is touched."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from nova3d.models.gta import (
    GTAAttnProcessor,
    GTAConfig,
    GTAGuardedAttention,
    GTAProcessorReplaced,
    gta_processor_names,
    install_gta,
    is_new_parameter,
    split_domains,
    split_parameters,
    stack_domains,
)
from nova3d.models.svd_configs import svd_xt_unet_config, tiny_unet_config
from nova3d.models.unet import (
    CheckpointedTemporalBlock,
    build_gta_unet,
    load_gta_unet,
    load_gta_weights,
    read_gta_config,
    save_gta_weights,
)
from tests.helpers_models import seeded

VARIANTS = {
    "full": GTAConfig(),
    "spatial_only": GTAConfig(temporal=False),
    "temporal_only": GTAConfig(spatial=False),
    "all_domain_keys": GTAConfig(keys="all_domains"),
}
LEVELS = {"full": {"spatial", "temporal"}, "spatial_only": {"spatial"}, "temporal_only": {"temporal"},
          "all_domain_keys": {"spatial", "temporal"}}
FRAMES, SIZE = 4, 8


def _vanilla(seed: int = 0) -> UNetSpatioTemporalConditionModel:
    return seeded(lambda: UNetSpatioTemporalConditionModel.from_config(tiny_unet_config()), seed)


def _gta(gta: GTAConfig, seed: int = 0) -> UNetSpatioTemporalConditionModel:
    return seeded(lambda: build_gta_unet(tiny_unet_config(), gta), seed)


@pytest.fixture(scope="module")
def vanilla() -> UNetSpatioTemporalConditionModel:
    return _vanilla()


def _inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """UNet kwargs for `batch` = D*B rows (domain-major), same conditioning for every row."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_unet_config()
    return {
        "sample": torch.randn(batch, FRAMES, cfg["in_channels"], SIZE, SIZE, generator=g),
        "timestep": torch.tensor(0.7),
        "encoder_hidden_states": torch.randn(1, 1, cfg["cross_attention_dim"], generator=g).expand(batch, 1, -1),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]]).expand(batch, 3),
    }


def _run(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


def _randomize_new(unet, only: str | None = None, seed: int = 1, std: float = 0.2) -> None:
    """Give GTA parameters (optionally only names containing `only`) non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if is_new_parameter(name) and (only is None or only in name):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_init_reproduces_vanilla(vanilla, variant):
    unet = _gta(VARIANTS[variant])
    assert set(gta_processor_names(unet).values()) == LEVELS[variant]
    inputs = _inputs(batch=4)
    with torch.no_grad():
        diff = (_run(unet, inputs) - _run(vanilla, inputs)).abs().max().item()
    assert diff <= 1e-5


def test_svd_xt_keys_and_shapes_on_meta():
    with torch.device("meta"):
        vanilla = UNetSpatioTemporalConditionModel.from_config(svd_xt_unet_config())
        unet = build_gta_unet(svd_xt_unet_config(), GTAConfig())
    ref = {k: v.shape for k, v in vanilla.state_dict().items()}
    got = {k: v.shape for k, v in unet.state_dict().items()}
    assert all(got.get(k) == shape for k, shape in ref.items())
    extra = set(got) - set(ref)
    assert extra and all(is_new_parameter(k) for k in extra)
    assert not any(is_new_parameter(k) for k in ref)
    # SVD-xt has 16 spatio-temporal transformers: one spatial + one temporal attn1 each.
    levels = list(gta_processor_names(unet).values())
    assert levels.count("spatial") == 16 and levels.count("temporal") == 16
    missing, unexpected = unet.load_state_dict(vanilla.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected
    pretrained, new = split_parameters(unet)
    assert len(pretrained) == len(list(vanilla.parameters()))
    assert sum(p.numel() for p in new) > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_gta_parameters(variant):
    unet = _gta(VARIANTS[variant])
    inputs = _inputs(batch=2)
    weight = torch.randn(_run(unet, inputs).shape, generator=torch.Generator().manual_seed(3))

    def grads():
        unet.zero_grad(set_to_none=True)
        (_run(unet, inputs) * weight).sum().backward()
        return {n: p.grad for n, p in unet.named_parameters() if is_new_parameter(n)}

    # At zero init the output projections and the domain embedding already get gradient ...
    g0 = grads()
    for name, grad in g0.items():
        if "gta_to_out" in name or "gta_domain_embedding" in name:
            assert grad is not None and grad.abs().sum() > 0, name
    # ... and once they are non-zero, so do the new Q/K/V and frame embeddings behind them.
    _randomize_new(unet, only="gta_to_out")
    g1 = grads()
    assert any("gta_frame_embed" in n for n in g1) == (variant != "spatial_only")
    for name, grad in g1.items():
        assert grad is not None and grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    unet = _gta(GTAConfig())
    _randomize_new(unet)
    inputs = _inputs(batch=2)

    def step():
        unet.zero_grad(set_to_none=True)
        out = _run(unet, inputs)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if is_new_parameter(n)}

    out_ref, g_ref = step()
    unet.enable_gradient_checkpointing()
    out_ckpt, g_ckpt = step()
    assert torch.allclose(out_ref, out_ckpt, atol=1e-6)
    assert all(torch.allclose(g_ref[n], g_ckpt[n], atol=1e-6) for n in g_ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_normal_input_changes_rgb_output_only_with_gta(variant):
    unet = _gta(VARIANTS[variant])
    _randomize_new(unet)
    inputs = _inputs(batch=4)  # D=2 domains x B=2 objects
    rgb, normal = split_domains(inputs["sample"], 2)
    poked = normal.clone()
    poked[1] += torch.randn(poked[1].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = split_domains(_run(unet, inputs), 2)
        after = split_domains(_run(unet, {**inputs, "sample": stack_domains([rgb, poked])}), 2)
    assert (before[0, 1] - after[0, 1]).abs().max() > 1e-4  # same object's RGB sees its normals
    assert (before[0, 0] - after[0, 0]).abs().max() <= 1e-6  # other objects are untouched


def test_gta_off_keeps_domains_independent():
    unet = _gta(GTAConfig(spatial=False, temporal=False))
    assert not gta_processor_names(unet)
    assert all("gta_domain_embedding" in n for n, _ in unet.named_parameters() if is_new_parameter(n))
    _randomize_new(unet)
    inputs = _inputs(batch=4)
    poked = inputs["sample"].clone()
    poked[2:] += 1.0  # all normals
    with torch.no_grad():
        before, after = _run(unet, inputs), _run(unet, {**inputs, "sample": poked})
    assert (before[:2] - after[:2]).abs().max() <= 1e-6
    assert (before[2:] - after[2:]).abs().max() > 1e-4


def test_single_domain_is_vanilla(vanilla):
    unet = _gta(GTAConfig(num_domains=1))
    assert not split_parameters(unet)[1] and not gta_processor_names(unet)
    inputs = _inputs(batch=3)
    with torch.no_grad():
        assert torch.equal(_run(unet, inputs), _run(vanilla, inputs))


def test_processor_pairs_same_row_and_is_domain_symmetric():
    """Unit level: row m of domain d attends jointly with row m of the other domain only, and
    the shared frame embedding makes the branch equivariant to swapping domains."""
    attn = seeded(lambda: Attention(query_dim=16, heads=2, dim_head=8))
    proc = GTAAttnProcessor(attn, num_domains=2, frame_embed_len=8)
    _randomize_new(proc)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 3, 5, 16, generator=g)  # [D*M, L, C]
    with torch.no_grad():
        base = AttnProcessor2_0()(attn, x)
        out = proc(attn, x)
        poked = x.clone()
        poked[3 + 1] += 1.0  # domain 1, row 1
        out_poked = proc(attn, poked)
        swapped = torch.cat([x[3:], x[:3]])
        out_swapped = proc(attn, swapped)
    assert not torch.allclose(out, base)
    change = (out - out_poked).abs().amax(dim=(1, 2))
    assert change[1] > 1e-4 and change[0] <= 1e-6 and change[2] <= 1e-6
    assert torch.allclose(out_swapped, torch.cat([out[3:], out[:3]]), atol=1e-6)
    with pytest.raises(ValueError):
        proc(attn, x[:5])  # not divisible by D


def _reference_branch(proc: GTAAttnProcessor, x: torch.Tensor) -> torch.Tensor:
    """The GTA branch written out per row: softmax(q k^T * scale) v over the chosen keys."""
    d, length = proc.num_domains, x.shape[1]
    x_qk = x + (proc.gta_frame_embed[:length] if proc.gta_frame_embed is not None else 0)
    q, k, v = proc.gta_to_q(x_qk), proc.gta_to_k(x_qk), proc.gta_to_v(x)
    m = x.shape[0] // d
    rows = []
    for e in range(d):
        for i in range(m):
            sources = [j for j in range(d) if proc.keys == "all_domains" or j != e]
            keys = torch.cat([k[j * m + i] for j in sources])  # [S, C]
            values = torch.cat([v[j * m + i] for j in sources])
            qh = q[e * m + i].unflatten(-1, (proc.heads, -1)).transpose(0, 1)  # [H, L, Dh]
            kh = keys.unflatten(-1, (proc.heads, -1)).transpose(0, 1)
            vh = values.unflatten(-1, (proc.heads, -1)).transpose(0, 1)
            w = torch.softmax(qh @ kh.transpose(1, 2) * proc.scale, dim=-1)
            rows.append((w @ vh).transpose(0, 1).flatten(1))
    return proc.gta_to_out(torch.stack(rows))


@pytest.mark.parametrize("keys", ["other_domains", "all_domains"])
@pytest.mark.parametrize("domains", [2, 3])
def test_branch_matches_its_definition(keys, domains):
    attn = seeded(lambda: Attention(query_dim=16, heads=2, dim_head=8))
    proc = GTAAttnProcessor(attn, num_domains=domains, frame_embed_len=6, keys=keys)
    _randomize_new(proc)
    x = torch.randn(domains * 2, 5, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(proc.gta_branch(x), _reference_branch(proc, x), atol=1e-5)


def test_stored_config_without_keys_means_all_domains():
    """Weights saved before `keys` existed were trained with the joint (all_domains) branch."""
    stored = {"spatial": True, "temporal": False, "num_domains": 2}
    assert GTAConfig.from_dict(stored) == GTAConfig(temporal=False, keys="all_domains")
    assert GTAConfig.from_dict({**stored, "keys": "other_domains"}).keys == "other_domains"
    with pytest.raises(ValueError, match="keys"):
        GTAConfig(keys="mine")


def test_deepcopy_rebinds_domain_hook():
    """EMA copies the model with deepcopy: the copy's hook must use the copy's embedding."""
    unet = _gta(GTAConfig())
    ema = copy.deepcopy(unet)
    (hook,) = ema.time_embedding._forward_hooks.values()
    assert hook.__self__ is ema.gta_domain_embedding
    _randomize_new(ema, only="gta_domain_embedding")
    inputs = _inputs(batch=2)
    with torch.no_grad():
        assert not torch.allclose(_run(ema, inputs), _run(unet, inputs))


def test_save_load_gta_weights_roundtrip(tmp_path):
    unet = _gta(GTAConfig())
    _randomize_new(unet)
    path = tmp_path / "gta_unet.safetensors"
    save_gta_weights(unet, path)
    assert read_gta_config(path) == GTAConfig()
    fresh = _gta(GTAConfig(), seed=7)
    result = load_gta_weights(fresh, path)
    assert not result.missing_keys and not result.unexpected_keys
    ref, got = unet.state_dict(), fresh.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    with pytest.raises(ValueError):
        load_gta_weights(_gta(GTAConfig(temporal=False)), path)


@pytest.mark.parametrize("subfolder", ["unet", None])
def test_load_gta_unet_from_save_pretrained(tmp_path, vanilla, subfolder):
    vanilla.save_pretrained(tmp_path / "unet")
    root = tmp_path if subfolder else tmp_path / "unet"
    unet = load_gta_unet(root, GTAConfig(), subfolder=subfolder)
    assert len(gta_processor_names(unet)) == 8
    inputs = _inputs(batch=2)
    with torch.no_grad():
        assert (_run(unet, inputs) - _run(vanilla, inputs)).abs().max() <= 1e-5
    # New weights follow the loaded dtype, so bf16 training needs no extra casting.
    if subfolder:
        half = load_gta_unet(root, GTAConfig(), subfolder=subfolder, torch_dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_install_twice_fails(vanilla):
    unet = install_gta(copy.deepcopy(vanilla), GTAConfig())
    with pytest.raises(RuntimeError):
        install_gta(unet, GTAConfig())


# ---------------------------------------------------------------- issue 14: checkpointing and the guard


def _step_peak_and_grads(unet, inputs) -> tuple[int, dict[str, torch.Tensor]]:
    """Peak bytes of live tensors over forward + backward (bench/live_tensors.py), and all grads."""
    from bench.live_tensors import LiveTensorTracker

    unet.zero_grad(set_to_none=True)
    tracker = LiveTensorTracker()
    tracker.track([*unet.parameters(), *inputs.values()])
    with tracker:
        _run(unet, inputs).square().mean().backward()
    return tracker.peak, {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_checkpointing_covers_the_temporal_blocks_same_gradients_less_memory():
    unet = _gta(GTAConfig())
    _randomize_new(unet)
    temporal = [m for m in unet.modules() if isinstance(m, CheckpointedTemporalBlock)]
    num_temporal = sum(level == "temporal" for level in gta_processor_names(unet).values())
    assert len(temporal) == num_temporal > 0 and not any(m.gradient_checkpointing for m in temporal)
    inputs = _inputs(batch=2)
    peak_off, g_off = _step_peak_and_grads(unet, inputs)
    unet.enable_gradient_checkpointing()  # diffusers' switch; the temporal blocks follow it
    assert all(m.gradient_checkpointing for m in temporal)
    for m in temporal:  # diffusers' coverage alone (what the UNet did before issue 14)
        m.gradient_checkpointing = False
    peak_diffusers, g_diffusers = _step_peak_and_grads(unet, inputs)
    for m in temporal:
        m.gradient_checkpointing = True
    peak_full, g_full = _step_peak_and_grads(unet, inputs)
    assert g_off.keys() == g_full.keys() and any(is_new_parameter(n) for n in g_full)
    for name in g_off:  # recomputation gives the same gradients, GTA's temporal weights included
        torch.testing.assert_close(g_full[name], g_off[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_diffusers[name], g_off[name], rtol=1e-5, atol=1e-6)
    assert peak_full < peak_diffusers < peak_off, (peak_full, peak_diffusers, peak_off)
    unet.disable_gradient_checkpointing()
    assert not any(m.gradient_checkpointing for m in temporal)


def test_every_builder_makes_temporal_blocks_checkpointable(tmp_path):
    from nova3d.pipeline import GTAUNet

    built = GTAUNet.build(tiny_unet_config(), GTAConfig())
    built.enable_gradient_checkpointing()
    copied = GTAUNet.from_unet(_gta(GTAConfig()))
    built.save_pretrained(tmp_path)
    for unet in (built, copied, GTAUNet.from_pretrained(tmp_path)):
        assert sum(isinstance(m, CheckpointedTemporalBlock) for m in unet.modules()) == 4  # tiny UNet: 4 levels
    assert all(m.gradient_checkpointing for m in built.modules() if isinstance(m, CheckpointedTemporalBlock))


@pytest.mark.parametrize("replace", ["set_attn_processor", "set_attn_processor_dict", "set_default_attn_processor",
                                     "layer_set_processor"])
def test_replacing_gta_processors_is_an_error(replace):
    unet = _gta(GTAConfig())
    _randomize_new(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items() if is_new_parameter(k)}
    names = gta_processor_names(unet)
    with pytest.raises((GTAProcessorReplaced, ValueError)) as err:
        if replace == "set_attn_processor":
            unet.set_attn_processor(AttnProcessor2_0())
        elif replace == "set_attn_processor_dict":
            unet.set_attn_processor({name: AttnProcessor2_0() for name in unet.attn_processors})
        elif replace == "set_default_attn_processor":
            unet.set_default_attn_processor()
        else:
            attn = dict(unet.named_modules())[next(iter(names)).removesuffix(".processor")]
            attn.set_processor(AttnProcessor2_0())
    if err.type is ValueError:  # diffusers' own refusal (it knows no GTA processor): fine as long as it refuses
        assert "GTAAttnProcessor" in str(err.value)
    assert gta_processor_names(unet) == names  # nothing replaced, no weight dropped
    after = {k: v for k, v in unet.state_dict().items() if is_new_parameter(k)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_guard_lets_gta_processors_replace_each_other_and_spares_other_layers():
    unet = _gta(GTAConfig())
    name = next(iter(gta_processor_names(unet)))
    attn = dict(unet.named_modules())[name.removesuffix(".processor")]
    assert isinstance(attn, GTAGuardedAttention)
    attn.set_processor(GTAAttnProcessor(attn, num_domains=2))  # GTA by GTA: allowed
    cross = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    assert type(cross) is Attention
    cross.set_processor(AttnProcessor2_0())  # layers without GTA are untouched by the guard
