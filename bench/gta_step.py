"""GTA-UNet vs the vanilla diffusers SVD UNet: one training step (forward + backward) on the SAME batch.

    python bench/gta_step.py [--quick] [--threads N]      # CPU: tiny and mid configs
    python bench/gta_step.py --gpu [--quick]               # CUDA: full SVD-xt UNet at 512² (64² latents)

Batch: RGB and normal videos of B = 1 object stacked domain-major, [2, F, 8, h, w] (4 noisy + 4
condition channels), with CLIP-sized cross-attention states and SVD's added time ids. The vanilla
UNet runs the same stacked batch (two independent videos), so the ratio is the cost of GTA alone.

CPU: float32, no checkpointing. Time = median over `reps` steps after warm-up, GTA and vanilla
alternated so load from other processes hits both alike. Peak memory = growth of the peak RSS
(getrusage ru_maxrss) over the first step, each (config, model) in its own subprocess — it counts
activations, gradients and allocator slack; weights are excluded.
GPU: bf16 autocast on float32 weights + gradient checkpointing, temporal blocks included (the training
setup, nova3d.models.unet.checkpoint_temporal_blocks); peak memory is
torch.cuda.max_memory_allocated over a step, weights and gradients included.
Models: "gta" (the default GTA-UNet: the branch attends to the other domain's tokens),
"gta_all_domains" (the joint form: the branch attends to both domains' tokens) and "vanilla".
`--breakdown` (CPU) also splits each model's step CPU time into the attention core (every
scaled_dot_product_attention call of a forward, replayed forward + backward in isolation) and the rest:
per GTA layer the branch adds (D-1)*L keys per query row (other_domains) or D*L (all_domains) to the
pretrained attention's L, so "ratio_floor" = 1 + (extra attention-core time) / (vanilla step) is about the
lowest ratio a rearrangement of projections, copies or kernel calls can reach for that form.
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

from diffusers import UNetSpatioTemporalConditionModel  # noqa: E402

from nova3d.models.gta import GTAConfig, install_gta  # noqa: E402
from nova3d.models.svd_configs import svd_xt_unet_config, tiny_unet_config  # noqa: E402
from nova3d.models.unet import checkpoint_temporal_blocks  # noqa: E402

DOMAINS = 2
# "gta" = the default GTA-UNet (branch keys: the other domain's tokens); "gta_all_domains" = the
# joint form (keys: both domains' tokens); "vanilla" = the baseline every ratio is against.
MODELS = ("gta", "gta_all_domains", "vanilla")
GTA_MODELS = {"gta": GTAConfig(num_domains=DOMAINS),
              "gta_all_domains": GTAConfig(num_domains=DOMAINS, keys="all_domains")}


def mid_unet_config() -> dict[str, Any]:
    """Three levels like SVD's first three (two cross-attention levels, head dim 32)."""
    cfg = tiny_unet_config()
    cfg.update(block_out_channels=[64, 128, 256], num_attention_heads=[2, 4, 8], cross_attention_dim=64,
               layers_per_block=1,
               down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 2 + ["DownBlockSpatioTemporal"],
               up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 2)
    return cfg


# name -> (UNet config, frames, latent side)
CONFIGS: dict[str, tuple[Callable[[], dict], int, int]] = {
    "tiny": (tiny_unet_config, 4, 16),
    "mid": (mid_unet_config, 8, 32),
    "svd_xt": (svd_xt_unet_config, 16, 64),
}


def build(config: str, model: str, device: str = "cpu") -> UNetSpatioTemporalConditionModel:
    """Same seed for both models: the vanilla weights are exactly the GTA-UNet's pretrained part."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel.from_config(CONFIGS[config][0]())
    checkpoint_temporal_blocks(unet)  # as every nova3d builder does: checkpointing covers the temporal blocks
    if model in GTA_MODELS:
        install_gta(unet, GTA_MODELS[model])
    return unet.train()


def make_inputs(config: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    cfg_fn, frames, side = CONFIGS[config]
    cfg = cfg_fn()
    g = torch.Generator().manual_seed(1)
    n = DOMAINS  # B = 1 object x 2 domains, domain-major
    ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(n, 1)
    inputs = {"sample": torch.randn(n, frames, cfg["in_channels"], side, side, generator=g),
              "timestep": torch.full((n,), 0.5),
              "encoder_hidden_states": torch.randn(1, 1, cfg["cross_attention_dim"], generator=g).repeat(n, 1, 1),
              "added_time_ids": ids}
    return {k: v.to(device) for k, v in inputs.items()}


def step(unet: torch.nn.Module, inputs: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None) -> None:
    """One forward + backward (no optimizer: its cost does not depend on GTA's attention)."""
    unet.zero_grad(set_to_none=True)
    device_type = inputs["sample"].device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with ctx:
        out = unet(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()


def timed_step(unet, inputs, autocast_dtype=None) -> float:
    """Seconds for one step (CUDA synchronised)."""
    sync = torch.cuda.synchronize if inputs["sample"].is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step(unet, inputs, autocast_dtype)
    sync()
    return time.perf_counter() - t0


def cpu_timed_step(unet, inputs) -> tuple[float, float]:
    """(wall, process CPU) seconds for one CPU step. With one thread the CPU time does not count
    the time other jobs on a shared machine hold the core, so it is the steadier figure."""
    w0, c0 = time.perf_counter(), time.process_time()
    step(unet, inputs)
    return time.perf_counter() - w0, time.process_time() - c0


def _sdpa_shapes(unet: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Counter:
    """{(q shape, k shape): calls} of every scaled_dot_product_attention in one forward."""
    shapes: Counter = Counter()
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        shapes[(tuple(q.shape), tuple(k.shape))] += 1
        return real(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy  # diffusers and gta.py call it via F.
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return shapes


def _sdpa_cpu_ms(q_shape: tuple, k_shape: tuple, reps: int) -> float:
    """Median process-CPU ms of one SDPA forward + backward on random tensors of these shapes."""
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(reps + 1):
        q = torch.randn(q_shape, generator=g, requires_grad=True)
        k, v = (torch.randn(k_shape, generator=g, requires_grad=True) for _ in range(2))
        t0 = time.process_time()
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
        times.append(time.process_time() - t0)
    return 1000 * statistics.median(times[1:])


def attention_breakdown(config: str, step_cpu_ms: dict[str, float], reps: int) -> dict[str, Any]:
    """Attention-core (SDPA fwd + bwd) CPU ms of each model: its calls replayed in isolation."""
    inputs, out = make_inputs(config), {}
    for model in MODELS:
        shapes = _sdpa_shapes(build(config, model), inputs)
        core = sum(n * _sdpa_cpu_ms(q, k, reps) for (q, k), n in shapes.items())
        out[model] = {"sdpa_calls": sum(shapes.values()), "attention_core_ms": round(core, 1),
                      "other_ms": round(step_cpu_ms[model] - core, 1)}
    for model in GTA_MODELS:
        extra = out[model]["attention_core_ms"] - out["vanilla"]["attention_core_ms"]
        out[model]["extra_attention_core_ms"] = round(extra, 1)
        out[model]["extra_other_ms"] = round(out[model]["other_ms"] - out["vanilla"]["other_ms"], 1)
        out[model]["ratio_floor"] = round(1 + extra / step_cpu_ms["vanilla"], 3)
    return out


# ---------------------------------------------------------------- CPU


def cpu_memory_worker(config: str, model: str, threads: int) -> dict[str, float]:
    """Run in a fresh process: peak-RSS growth (MiB) over the first step."""
    torch.set_num_threads(threads)
    unet, inputs = build(config, model), make_inputs(config)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    step(unet, inputs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_step_mib": (after - before) / 1024, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


def cpu_memory(config: str, model: str, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-worker", config, model, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_times(config: str, warmup: int, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step (wall, process CPU) seconds of each model, alternated."""
    models = {m: build(config, m) for m in MODELS}
    inputs = make_inputs(config)
    for _ in range(warmup):
        for m in MODELS:
            step(models[m], inputs)
    times: dict[str, list[float]] = {m: [] for m in MODELS}
    cpu: dict[str, list[float]] = {m: [] for m in MODELS}
    for _ in range(reps):  # alternate, so background load hits both models alike
        for m in MODELS:
            wall, proc = cpu_timed_step(models[m], inputs)
            times[m].append(wall)
            cpu[m].append(proc)
    return times, cpu


def cpu_bench(configs: list[str], warmup: int, reps: int, threads: int, breakdown: bool = False) -> dict[str, Any]:
    results = {}
    for config in configs:
        mem = {m: cpu_memory(config, m, threads) for m in MODELS}
        times, cpu = cpu_times(config, warmup, reps)
        ms = {m: 1000 * statistics.median(times[m]) for m in MODELS}
        cpu_ms = {m: 1000 * statistics.median(cpu[m]) for m in MODELS}
        _, frames, side = CONFIGS[config]
        results[config] = {
            "batch": [DOMAINS, frames, 8, side, side],
            "params_m": {m: round(mem[m]["params_m"], 3) for m in MODELS},
            "step_ms": {m: round(ms[m], 1) for m in MODELS},
            "step_ms_all": {m: [round(1000 * t, 1) for t in times[m]] for m in MODELS},
            "cpu_step_ms": {m: round(cpu_ms[m], 1) for m in MODELS},
            "peak_step_mib": {m: round(mem[m]["peak_step_mib"], 1) for m in MODELS},
        }
        r = results[config]
        vanilla_mib = max(mem["vanilla"]["peak_step_mib"], 1e-6)
        for model in GTA_MODELS:  # "time_ratio" etc. = the default GTA; "_all_domains" = the joint form
            suffix = model.removeprefix("gta")
            r["time_ratio" + suffix] = round(ms[model] / ms["vanilla"], 3)
            r["cpu_time_ratio" + suffix] = round(cpu_ms[model] / cpu_ms["vanilla"], 3)
            r["memory_ratio" + suffix] = round(mem[model]["peak_step_mib"] / vanilla_mib, 3)
            print(f"{config:5s} batch {r['batch']}: {model} {r['step_ms'][model]:.0f} ms vs vanilla "
                  f"{r['step_ms']['vanilla']:.0f} ms ({r['time_ratio' + suffix]:.2f}x; CPU time "
                  f"{r['cpu_time_ratio' + suffix]:.2f}x); step peak RSS {r['peak_step_mib'][model]:.0f} MiB "
                  f"vs {r['peak_step_mib']['vanilla']:.0f} MiB ({r['memory_ratio' + suffix]:.2f}x)", flush=True)
        if breakdown:
            b = r["breakdown"] = attention_breakdown(config, cpu_ms, reps)
            for model in GTA_MODELS:
                print(f"{config:5s} CPU ms: attention core {model} {b[model]['attention_core_ms']:.0f} vs "
                      f"vanilla {b['vanilla']['attention_core_ms']:.0f}, rest {b[model]['other_ms']:.0f} vs "
                      f"{b['vanilla']['other_ms']:.0f}; floor from the extra attention alone "
                      f"{b[model]['ratio_floor']:.2f}x", flush=True)
    return results


# ---------------------------------------------------------------- GPU


def full_bench(device: str, config: str, warmup: int, reps: int) -> dict[str, Any]:
    """bf16 autocast + gradient checkpointing, GTA then vanilla, one model on the device at a time."""
    cuda = device.startswith("cuda")
    results: dict[str, Any] = {"config": config, "batch": None, "autocast": "bfloat16", "gradient_checkpointing": True}
    for model in MODELS:
        unet = build(config, model, device)
        unet.enable_gradient_checkpointing()
        inputs = make_inputs(config, device)
        results["batch"] = list(inputs["sample"].shape)
        for _ in range(warmup):
            step(unet, inputs, torch.bfloat16)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed_step(unet, inputs, torch.bfloat16) for _ in range(reps)]
        results[model] = {"step_ms": round(1000 * statistics.median(times), 1),
                          "step_ms_all": [round(1000 * t, 1) for t in times],
                          "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None}
        del unet, inputs
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    for model in GTA_MODELS:
        suffix = model.removeprefix("gta")
        results["time_ratio" + suffix] = round(results[model]["step_ms"] / results["vanilla"]["step_ms"], 3)
        if cuda:
            results["memory_ratio" + suffix] = round(results[model]["peak_gib"] / results["vanilla"]["peak_gib"], 3)
    if cuda:
        results["device_name"] = torch.cuda.get_device_name(device)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--gpu", action="store_true", help="full SVD-xt UNet at 512² on CUDA instead of the CPU configs")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the CPU machines are small and shared)")
    parser.add_argument("--breakdown", action="store_true", help="CPU: also profile attention core vs the rest")
    parser.add_argument("--configs", default="tiny,mid", help="CPU configs, comma-separated (tiny, mid)")
    parser.add_argument("--device", default="cuda", help="with --gpu: where the GPU path runs (cpu with --config tiny: "
                        "its dry run, bench/gpu_check.sh --cpu-dry-run)")
    parser.add_argument("--config", default="svd_xt", choices=list(CONFIGS), help="with --gpu: the UNet config")
    parser.add_argument("--memory-worker", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(cpu_memory_worker(*args.memory_worker, args.threads)))
        return 0
    warmup, reps = (1, 3) if args.quick else (2, 7)
    if args.gpu:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("no CUDA: --gpu needs a CUDA device; nothing measured", file=sys.stderr)
            print(json.dumps({"mode": "gpu", "status": "skipped", "reason": "no CUDA"}))
            return 0
        figures = {"mode": "gpu", "device": args.device, "status": "ok", "warmup": warmup, "reps": reps,
                   **full_bench(args.device, args.config, warmup, reps)}
    else:
        torch.set_num_threads(args.threads)
        figures = {"mode": "cpu", "status": "ok", "threads": args.threads, "warmup": warmup, "reps": reps,
                   "torch": torch.__version__,
                   "configs": cpu_bench(args.configs.split(","), warmup, reps, args.threads, args.breakdown)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
