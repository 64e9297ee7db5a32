"""One steady-state GTA-UNet training step's memory, tracked op by op (bench/memory_ladder.py's rows).

`step_memory` builds the UNet (SVD-xt, the CPU validation sizes, or the image prior's SD 2.1) under
FakeTensorMode, allocates the optimizer states, then runs forward, backward, clipping and the optimizer
step under a LiveTensorTracker; fake=False runs the same step on real CPU tensors.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from diffusers import UNetSpatioTemporalConditionModel  # noqa: E402

from bench.live_tensors import LiveTensorTracker  # noqa: E402
from nova3d.models.gta import GTAConfig, install_gta  # noqa: E402
from nova3d.models.image_configs import sd21_unet_config  # noqa: E402
# Imported here, not under a FakeTensorMode: its module-level σ table must be a real tensor.
from nova3d.models.image_unet import GTAImageUNet  # noqa: E402
from nova3d.models.multiview import MultiViewConfig  # noqa: E402
from nova3d.models.svd_configs import svd_xt_unet_config, tiny_unet_config  # noqa: E402
from nova3d.models.unet import checkpoint_temporal_blocks  # noqa: E402

GIB = 2**30
DOMAINS = 2
VAE_CHUNK = 16  # images per VAE encode call in training (nova3d.systems.mv_diffusion.VAE_CHUNK)


def mid_unet_config() -> dict[str, Any]:
    """Three levels like SVD's first three (bench/gta_step.py's "mid"): the CPU validation size."""
    cfg = tiny_unet_config()
    cfg.update(block_out_channels=[64, 128, 256], num_attention_heads=[2, 4, 8], cross_attention_dim=64,
               down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 2 + ["DownBlockSpatioTemporal"],
               up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 2)
    return cfg


UNET_CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "svd_xt": svd_xt_unet_config, "mid": mid_unet_config, "tiny": tiny_unet_config}
# The image prior (issue 15 §1, nova3d.models.image_unet): SD 2.1's UNet with multi-view attention in
# either layout, with gta_full's conditioner (CLIP ViT-H + SVD's VAE, as ablations/image_prior.yaml).
IMAGE_ARCHS = {"sd21_dense": "dense", "sd21_orbit": "orbit"}
LATENT_SCALE = {"svd_xt": 8, "mid": 8, "tiny": 2, "sd21_dense": 8, "sd21_orbit": 8}  # pixels per latent cell


class Adam8bitModel(torch.optim.Optimizer):
    """Memory model of bitsandbytes' 8-bit AdamW: two uint8 states per parameter (plus block
    scales, <1 %), updated in place by a fused kernel. Only for predictions: it does not train."""

    def __init__(self, params, lr: float = 1e-5) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.uint8)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.uint8)
                p.add_(p.grad, alpha=-group["lr"])


def build_unet(arch: str, model: str, checkpointing: str,
               dtype: torch.dtype = torch.float32) -> UNetSpatioTemporalConditionModel:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: .to() cannot swap fake parameters
    try:
        if arch in IMAGE_ARCHS:
            return build_image_unet(arch, model, checkpointing)
        unet = UNetSpatioTemporalConditionModel.from_config(UNET_CONFIGS[arch]())
    finally:
        torch.set_default_dtype(default)
    checkpoint_temporal_blocks(unet)
    if model == "gta":
        install_gta(unet, GTAConfig(num_domains=DOMAINS))
    if checkpointing != "none":
        unet.enable_gradient_checkpointing()
    if checkpointing == "diffusers":  # diffusers' own coverage only: the temporal blocks recompute nothing
        for m in unet.modules():
            if type(m).__name__ == "CheckpointedTemporalBlock":
                m.gradient_checkpointing = False
    return unet.train()


def build_image_unet(arch: str, model: str, checkpointing: str):
    """GTAImageUNet on SD 2.1's config with GTA and multi-view attention, called like the GTA-SVD UNet."""
    if model != "gta":
        raise ValueError(f"image-prior ladder rows are GTA only, got model {model!r}")
    unet = GTAImageUNet.build(sd21_unet_config(), GTAConfig(num_domains=DOMAINS), MultiViewConfig(layout=IMAGE_ARCHS[arch]))
    if checkpointing != "none":  # diffusers' switch covers every block of an image UNet ("full" = "diffusers")
        unet.enable_gradient_checkpointing()
    return unet.train()


def conditioner_bytes(arch: str) -> int:
    """Resident bytes of the frozen float32 CLIP + VAE (built on the meta device: no memory)."""
    if arch not in ("svd_xt", *IMAGE_ARCHS):
        return 0
    from nova3d.models.factory import build_svd_xt_conditioner

    with torch.device("meta"):
        cond = build_svd_xt_conditioner()
    return sum(p.numel() * 4 for p in cond.parameters())


def vae_encode_peak(arch: str, side: int, dtype: torch.dtype = torch.float32) -> int:
    """Transient bytes of one VAE encode call of VAE_CHUNK images at side x side pixels (fake tensors)."""
    if arch not in ("svd_xt", *IMAGE_ARCHS):
        return 0
    from diffusers import AutoencoderKLTemporalDecoder

    from nova3d.models.factory import svd_xt_vae_config

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # .to() cannot swap fake parameters
    try:
        vae = AutoencoderKLTemporalDecoder(**svd_xt_vae_config()).eval()
    finally:
        torch.set_default_dtype(default)
    x = torch.randn(VAE_CHUNK, 3, side, side, dtype=dtype)
    tracker = LiveTensorTracker()
    with torch.no_grad(), tracker:
        vae.encode(x).latent_dist.sample()
    return tracker.peak


def step_memory(arch: str, model: str, checkpointing: str, latent: int, frames: int, *, fake: bool = True,
                precision: str = "bf16-mixed", optimizer: str = "adamw", batch: int = 1) -> dict[str, Any]:
    """Peak bytes of one steady-state training step (module docstring); fake=False runs real tensors."""
    # allow_non_fake_inputs: module-level constants (the image UNet's σ table) are real tensors
    with torch.random.fork_rng(devices=[]), (torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)
                                             if fake else nullcontext()):
        torch.manual_seed(0)
        unet = build_unet(arch, model, checkpointing,
                          torch.bfloat16 if precision == "bf16-true" else torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = (torch.optim.AdamW(params, lr=1e-5, foreach=True) if optimizer == "adamw" else
               torch.optim.AdamW(params, lr=1e-5, fused=True) if optimizer == "adamw_fused" else Adam8bitModel(params))
        for p in params:  # allocate the optimizer states: the step measured is a steady-state one
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        cfg = unet.config
        n = DOMAINS * batch  # objects x domains, domain-major
        dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
        channels = getattr(unet, "latent_in_channels", cfg.in_channels)  # the image UNet's conv_in takes 4 + 4
        x = torch.randn(n, frames, channels, latent, latent, dtype=dtype)
        ehs = torch.randn(n, 1, cfg.cross_attention_dim, dtype=dtype)
        ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(n, 1)
        sigma = torch.full((n,), 0.5)
        tracker = LiveTensorTracker()
        tracker.track([*unet.parameters(), *unet.buffers(), x, ehs, ids, sigma])
        tracker.track(s for st in opt.state.values() for s in st.values())
        resident = tracker.current
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        with tracker:
            with autocast:
                out = unet(x, sigma, encoder_hidden_states=ehs, added_time_ids=ids, return_dict=False)[0]
                loss = out.float().square().mean()
            del out
            tracker.mark("forward")
            loss.backward()
            del loss
            tracker.mark("backward")
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # trainer.gradient_clip_val
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        states = sum(s.numel() * s.element_size() for st in opt.state.values() for s in st.values())
        return {"params_b": round(sum(p.numel() for p in unet.parameters()) / 1e9, 4),
                "weights_bytes": weights, "grads_bytes": weights, "optimizer_bytes": states,
                "resident_bytes": resident, "peak_bytes": tracker.peak,
                "peak_forward_bytes": tracker.marks["forward"], "peak_backward_bytes": tracker.marks["backward"]}
