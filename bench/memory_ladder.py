"""The memory ladder: predicted peak memory of one GTA-SVD training step, per configuration, no GPU needed.

    python bench/memory_ladder.py [--quick] [--out FILE]

One training step of the real SVD-xt GTA-UNet (1.5 B parameters) as Lightning runs it, batch 1
object per GPU (its RGB and normal videos stacked domain-major): bf16-mixed autocast forward,
backward, gradient clipping, AdamW step, with the optimizer states already allocated (a step in
steady state), plus the frozen conditioner (CLIP ViT-H + SVD VAE, float32) resident and its VAE
encode of the target videos (chunks of 16 images, autocast off) as a transient before the UNet runs.

How, without a GPU or the memory: every tensor is a FakeTensor (torch._subclasses.FakeTensorMode:
shapes, dtypes and aliasing, no storage), and LiveTensorTracker (a TorchDispatchMode, the same idea
as torch.distributed._tools.mem_tracker.MemTracker, about 40x faster here) adds up the bytes of every
live storage after each op; the peak is the prediction. The fake tensors live on the CPU, so CPU
autocast stands in for CUDA autocast (same bf16 casts for linear/conv/matmul/attention) and SDPA
takes the CPU flash kernel (like CUDA flash, it keeps only the output and log-sum-exp).
Not counted: the CUDA context and cuBLAS/cuDNN workspaces (~0.5-1 GiB) and caching-allocator
fragmentation (typically 5-15 %): docs/training_recipes.md adds a margin before saying "fits".

Validation (`validation` rows, measured_peak_gib): the same step with real float32 tensors on the
CPU, at sizes these 2-core / 24 GB machines can run (the tiny test UNet and a three-level "mid" UNet),
in a fresh subprocess with glibc's mmap threshold fixed at 128 KiB (so freed memory leaves the RSS): the tracker's prediction from fake tensors against (a) the tracker on the real
tensors and (b) the growth of the process's peak RSS over the step (weights, gradients, AdamW states
and activations all allocated after the baseline is read), the independent measurement.

Rows: checkpointing "none" / "diffusers" (diffusers' enable_gradient_checkpointing alone: resnets and
spatial transformer blocks) / "full" (plus the temporal transformer blocks, nova3d.models.unet, which
is what `model.gradient_checkpointing: true` does now); model "gta" or "vanilla" (same batch).
The last line printed is one JSON object; its `configs` list has resolution, views, checkpointing
(true = "full"), model, predicted_peak_gib and, for the validation rows, measured_peak_gib.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from diffusers import UNetSpatioTemporalConditionModel  # noqa: E402

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
CHECKPOINTING = ("none", "diffusers", "full")
PRECISIONS = ("bf16-mixed", "bf16-true", "32")
OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit")  # adamw: foreach, torch's default on CUDA (and Lightning's)
MMAP_THRESHOLD = 128 * 1024  # bytes; see validation_row


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


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of live tensor storages: those `track`ed, plus every op output while the mode is on.

    A storage counts once (views share it) and stops counting when it is freed (weakref.finalize).
    `peak` is the most bytes alive at once; `mark(name)` records the current peak under a name."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.finalize] = {}
        self.current = 0
        self.peak = 0
        self.marks: dict[str, int] = {}

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()

        def freed(key: int = key, size: int = size) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= size

        self._live[key] = weakref.finalize(storage, freed)
        self.current += size
        self.peak = max(self.peak, self.current)

    def mark(self, name: str) -> None:
        self.marks[name] = self.peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(tree_leaves(out))
        return out


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


def ladder_row(resolution: int, views: int, checkpointing: str, model: str, precision: str = "bf16-mixed",
               optimizer: str = "adamw", arch: str = "svd_xt", batch: int = 1) -> dict[str, Any]:
    """One row: the UNet step's peak plus the conditioner's weights, or the UNet's state plus the
    VAE encode transient if that is higher (the encode runs before the UNet's forward)."""
    t0 = time.perf_counter()
    latent = resolution // LATENT_SCALE[arch]
    unet = step_memory(arch, model, checkpointing, latent, views, precision=precision, optimizer=optimizer,
                       batch=batch)
    with torch._subclasses.FakeTensorMode():
        encode = vae_encode_peak(arch, resolution, torch.bfloat16 if precision == "bf16-true" else torch.float32)
    cond = conditioner_bytes(arch) // (2 if precision == "bf16-true" else 1)  # bf16-true converts it too
    peak = cond + max(unet["peak_bytes"], unet["resident_bytes"] + encode)
    return {"arch": arch, "resolution": resolution, "views": views, "checkpointing": checkpointing == "full",
            "checkpointing_kind": checkpointing, "model": model, "precision": precision, "optimizer": optimizer,
            "batch_per_gpu": batch, "predicted_peak_gib": round(peak / GIB, 2),
            "unet_step_peak_gib": round(unet["peak_bytes"] / GIB, 2),
            # above the resident weights + optimizer states: at the end of forward (activations kept
            # for backward) and over the whole step (gradients and optimizer-step temporaries included)
            "forward_activations_gib": round((unet["peak_forward_bytes"] - unet["resident_bytes"]) / GIB, 2),
            "step_above_resident_gib": round((unet["peak_bytes"] - unet["resident_bytes"]) / GIB, 2),
            "weights_gib": round(unet["weights_bytes"] / GIB, 2), "optimizer_gib": round(unet["optimizer_bytes"] / GIB, 2),
            "conditioner_gib": round(cond / GIB, 2), "vae_encode_transient_gib": round(encode / GIB, 2),
            "unet_params_b": unet["params_b"], "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- validation against a real CPU step


def measure_worker(arch: str, model: str, checkpointing: str, latent: int, frames: int) -> dict[str, Any]:
    """In a fresh process: the real float32 CPU step, tracked, and its peak-RSS growth."""
    torch.set_num_threads(1)
    gc.collect()
    # The high-water mark reset to the current RSS first: otherwise a transient peak of the imports
    # hides part of the step's (measured 0.72x the prediction on a CI machine, 2026-12-07).
    before = _reset_peak_rss()
    real = step_memory(arch, model, checkpointing, latent, frames, fake=False, precision="32")
    after = _proc_status_bytes("VmHWM")
    return {"tracked_real_bytes": real["peak_bytes"], "rss_growth_bytes": after - before}


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux: `5` into /proc/self/clear_refs) and return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def validation_row(arch: str, model: str, checkpointing: str, latent: int, frames: int) -> dict[str, Any]:
    predicted = step_memory(arch, model, checkpointing, latent, frames, precision="32")["peak_bytes"]
    cmd = [sys.executable, __file__, "--measure-worker", arch, model, checkpointing, str(latent), str(frames)]
    # A fixed mmap threshold: glibc then returns every freed tensor to the OS at once, so the peak RSS
    # counts live memory; with its default (dynamic) threshold, freed activations stay in the heap and
    # the RSS of a checkpointed step measured 2.8x its live peak (docs/benchmarks.md).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    return {"resolution": latent * LATENT_SCALE[arch], "views": frames, "checkpointing": checkpointing == "full",
            "checkpointing_kind": checkpointing, "model": model, "arch": arch, "precision": "32", "device": "cpu",
            "predicted_peak_gib": round(predicted / GIB, 4),
            "measured_peak_gib": round(measured["rss_growth_bytes"] / GIB, 4),
            "tracked_real_peak_gib": round(measured["tracked_real_bytes"] / GIB, 4),
            "measured_over_predicted": round(measured["rss_growth_bytes"] / predicted, 3)}


# ---------------------------------------------------------------- main

LADDER = [(512, 16), (256, 16), (512, 6)]  # the recipe, half resolution, views_6
RECIPES = {  # docs/training_recipes.md: experiments/recipes/*.yaml (and one that needs code: adamw8bit)
    "gpu80gb": dict(resolution=512, views=16, checkpointing="full", model="gta", batch=2),
    "gpu48gb": dict(resolution=512, views=16, checkpointing="full", model="gta"),
    "gpu24gb": dict(resolution=512, views=16, checkpointing="full", model="gta", precision="bf16-true"),
    "gpu24gb_256": dict(resolution=256, views=16, checkpointing="full", model="gta", precision="bf16-true"),
    "adamw8bit_512": dict(resolution=512, views=16, checkpointing="full", model="gta", optimizer="adamw8bit"),
    "adamw_fused_512": dict(resolution=512, views=16, checkpointing="full", model="gta", optimizer="adamw_fused"),
}


def run(quick: bool, toy: bool = False, image_prior: bool = False) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    if image_prior:  # the image-prior backbone beside the recipe's SVD row, same step and batch
        for arch in ("svd_xt", *IMAGE_ARCHS):
            rows.append(ladder_row(512, 16, "full", "gta", arch=arch))
            print(json.dumps(rows[-1]), flush=True)
        return {"configs": rows, "recipes": {}}
    if toy:  # gpu_check.sh --cpu-dry-run: the same code at toy size, seconds
        rows.append(ladder_row(64, 4, "full", "gta", arch="tiny"))
        validation = [validation_row("tiny", "gta", "full", 8, 4)]
        return {"configs": rows + validation, "recipes": {}}
    for resolution, views in LADDER:
        for ckpt in ("none", "full"):
            for model in ("gta", "vanilla"):
                if quick and model == "vanilla" and (resolution, views) != (512, 16):
                    continue
                rows.append(ladder_row(resolution, views, ckpt, model))
                print(json.dumps(rows[-1]), flush=True)
    rows.append(ladder_row(512, 16, "diffusers", "gta"))  # what the temporal checkpointing adds
    print(json.dumps(rows[-1]), flush=True)
    recipes = {}
    for name, kw in RECIPES.items():
        if (kw.get("optimizer", "adamw") == "adamw" and kw.get("precision", "bf16-mixed") == "bf16-mixed"
                and kw.get("batch", 1) == 1):
            same = [r for r in rows if r["resolution"] == kw["resolution"] and r["views"] == kw["views"]
                    and r["checkpointing_kind"] == kw["checkpointing"] and r["model"] == kw["model"]]
            if same:
                recipes[name] = same[0]["predicted_peak_gib"]
                continue
        row = ladder_row(**kw)
        recipes[name] = row["predicted_peak_gib"]
        print(json.dumps({"recipe": name, **row}), flush=True)
    validation = [validation_row("tiny", "gta", "none", 16, 4), validation_row("mid", "gta", "none", 32, 8),
                  validation_row("mid", "gta", "full", 32, 8)]
    if not quick:
        validation.append(validation_row("mid", "vanilla", "none", 32, 8))
    for v in validation:
        print(json.dumps(v), flush=True)
    return {"configs": rows + validation, "recipes": recipes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vanilla rows only at 512²x16; fewer validation rows")
    parser.add_argument("--toy", action="store_true", help="the tiny UNet only (bench/gpu_check.sh --cpu-dry-run)")
    parser.add_argument("--image-prior", action="store_true",
                        help="the image-prior backbone (SD 2.1, dense and orbit multi-view) beside SVD-xt, 512² x 16")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the machines are small and shared)")
    parser.add_argument("--measure-worker", nargs=5, metavar=("ARCH", "MODEL", "CKPT", "LATENT", "FRAMES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.measure_worker:
        arch, model, ckpt, latent, frames = args.measure_worker
        print(json.dumps(measure_worker(arch, model, ckpt, int(latent), int(frames))))
        return 0
    t0 = time.perf_counter()
    result = {"bench": "memory_ladder", "status": "ok", "torch": torch.__version__, "batch_per_gpu": 1,
              "domains": DOMAINS, "quick": args.quick, "toy": args.toy, **run(args.quick, args.toy, args.image_prior),
              "seconds": round(time.perf_counter() - t0, 1)}
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
