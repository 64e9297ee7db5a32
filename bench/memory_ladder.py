"""The memory ladder: predicted peak memory of one GTA-SVD training step, per configuration, no GPU needed.

    python bench/memory_ladder.py [--quick] [--out FILE]

One training step of the real SVD-xt GTA-UNet (1.5 B parameters) as Lightning runs it, batch 1
object per GPU (its RGB and normal videos stacked domain-major): bf16-mixed autocast forward,
backward, gradient clipping, AdamW step, with the optimizer states already allocated (a step in
steady state), plus the frozen conditioner (CLIP ViT-H + SVD VAE, float32) resident and its VAE
encode of the target videos (chunks of 16 images, autocast off) as a transient before the UNet runs.

How, without a GPU or the memory: every tensor is a FakeTensor (torch._subclasses.FakeTensorMode:
shapes, dtypes and aliasing, no storage; the step is bench/step_memory.py), and LiveTensorTracker
(bench/live_tensors.py, a TorchDispatchMode, the same idea as torch.distributed._tools.mem_tracker.
MemTracker, about 40x faster here) adds up the bytes of every live storage after each op; the peak is
the prediction. The fake tensors live on the CPU, so CPU autocast stands in for CUDA autocast (same
bf16 casts for linear/conv/matmul/attention) and SDPA takes the CPU flash kernel (like CUDA flash, it
keeps only the output and log-sum-exp). Not counted: the CUDA context and cuBLAS/cuDNN workspaces
(~0.5-1 GiB) and caching-allocator fragmentation (typically 5-15 %): docs/training_recipes.md adds a
margin before saying "fits".

Validation (`validation` rows, measured_peak_gib; bench/memory_validation.py): the same step with real
float32 tensors on the CPU, at sizes these 2-core / 24 GB machines can run (the tiny test UNet and a
three-level "mid" UNet), in a fresh subprocess with glibc's mmap threshold fixed at 128 KiB (so freed
memory leaves the RSS): the tracker's prediction from fake tensors against (a) the tracker on the real
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
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

# The step's memory model (bench/step_memory.py), its tracker and its real-tensor check live apart.
from bench.memory_validation import validation_row  # noqa: E402
from bench.step_memory import (DOMAINS, GIB, IMAGE_ARCHS, LATENT_SCALE, conditioner_bytes,  # noqa: E402
                               step_memory, vae_encode_peak)

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
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
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
