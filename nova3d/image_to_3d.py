"""`nova3d image-to-3d`: one image -> generated views -> de-conflict fusion -> textured mesh.

    nova3d image-to-3d --image IMG --model DIR --out OUT [--steps N] [--seed N] [--guidance MIN MAX]
                       [--device D] [--fusion-experiment fusion/default] [key=value ...]

OUT gets the generated object folder under views/<image name>/ (nova3d.generate) and everything
`nova3d fuse` writes (mesh.glb/.obj/.ply, turntable.gif, conflict_maps.png, metrics.json, ...)
plus image_to_3d.json (inputs, settings, timings). Every cheap check (fusion config, device, model
folder, image, OUT) runs before any weights load. Fusion writes into OUT/.fusion.partial/ and its
files move into OUT only when it succeeded; when it fails, the generated views stay for
inspection and the error (one line) says where.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from nova3d.atomic import PARTIAL_SUFFIX, check_writable, staged_entries, write_json_atomic
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.fuse import DEFAULT_EXPERIMENT, FuseResult, fuse_object, load_fusion_config
from nova3d.fusion.config import FusionExperimentConfig
from nova3d.devices import resolve_device
from nova3d.generate import GenerateSettings, check_model_dir, generate_object
from nova3d.signals import Interrupted

VIEWS_DIR = "views"  # OUT/views/<object id>/: the generated object folder
STAGING_NAME = "fusion"  # fusion writes into OUT/.fusion.partial/ (nova3d.atomic.staged_entries), moved in on success
STAGING_DIR = f".{STAGING_NAME}{PARTIAL_SUFFIX}"
RECORD_FILE = "image_to_3d.json"


@dataclass
class ImageTo3DResult:
    """Where everything went. Paths are inside `out_dir`."""

    out_dir: Path
    views: Path  # the generated object folder (OUT/views/<id>)
    meshes: dict[str, Path]  # format -> OUT/mesh.<format>
    turntable: Path
    conflict_maps: Path | None  # None: the fusion experiment has no conflict maps
    metrics: dict  # metrics.json as written by nova3d.fuse
    seconds_generate: float
    seconds_fuse: float


def load_config(experiment: str = DEFAULT_EXPERIMENT, overrides: Sequence[str] = (),
                device: str = "auto") -> FusionExperimentConfig:
    """The fusion config; `device` (the --device flag) applies unless an override names `device=`."""
    cfg = load_fusion_config(experiment, list(overrides))
    if not any(o.split("=", 1)[0].strip() == "device" for o in overrides):
        cfg.device = device
    resolve_device(cfg.device)  # a bad or unavailable device fails now, not after generation
    return cfg


def object_id_of(image: str | Path) -> str:
    try:
        return schema.safe_object_id(Path(image).stem)
    except ValueError as err:
        raise Nova3DError(str(err)) from err


def check_out_dir(out: Path, object_id: str) -> None:
    """OUT may hold other images' views/ only: fusion's files must not replace anything."""
    check_writable(out)  # also: --out is a file, or inside one
    taken = sorted(p.name for p in out.iterdir() if p.name not in (VIEWS_DIR, STAGING_DIR)) if out.is_dir() else []
    if taken:
        raise Nova3DError(f"{out} already holds {', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''}; "
                          "remove it or choose another --out")
    if (out / VIEWS_DIR / object_id).exists():
        raise Nova3DError(f"{out / VIEWS_DIR / object_id} already exists; remove it or choose another --out")


def generate_views(image: str | Path, model: str | Path, out: Path, settings: GenerateSettings) -> Path:
    """Stage 1: the image's views into OUT/views/<id>/ (an object folder); returns that folder."""
    folder = generate_object(image, model, out / VIEWS_DIR, settings)
    gc.collect()  # the pipeline is gone: give its GPU memory back before fusion allocates
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def fuse_generated(views: str | Path, out: str | Path, cfg: FusionExperimentConfig, log=None) -> FuseResult:
    """Stage 2: fuse the object folder `views` into `out` (mesh.glb etc. directly in `out`).

    Fusion runs in out/.fusion.partial/; its files move into `out` only after it succeeded. A
    Nova3DError from fusion (empty masks, divergence, no surface) becomes one line saying the
    views are kept; the partial output is removed either way."""
    views, out = Path(views), Path(out)
    kept = (f"generated views kept at {views} for inspection "
            f"(retry with: nova3d fuse --views {views} --out DIR)")
    try:
        with staged_entries(out, STAGING_NAME) as staging:  # fusion's files enter OUT only once it succeeded
            result = fuse_object(views, staging, cfg, log=log)
    except Interrupted as err:  # keep its exit status (128 + signal)
        raise Interrupted(err.signum, f"{err}; {kept}") from err
    except Nova3DError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise Nova3DError(f"fusion failed: {first}; {kept}") from err
    except BaseException as err:  # a bug: say where the views are
        err.add_note(kept)
        raise
    meshes = {fmt: out / p.relative_to(staging) for fmt, p in result.meshes.items()}
    return dataclasses.replace(result, out_dir=out, meshes=meshes)


def image_to_3d(image: str | Path, model: str | Path, out: str | Path, settings: GenerateSettings = GenerateSettings(),
                cfg: FusionExperimentConfig | None = None, log=print) -> ImageTo3DResult:
    """Generate the views of `image` with the pipeline in `model`, fuse them, export the mesh into `out`.

    `log(str)` gets one line as each stage starts (the stages' own progress bars go to stderr)."""
    cfg = cfg or load_config()
    out = Path(out)
    settings.check()
    resolve_device(settings.device)
    check_model_dir(model)
    object_id = object_id_of(image)
    check_out_dir(out, object_id)

    log(f"[1/2] generating views of {image} with {model} ({settings.steps} steps)")
    t0 = time.perf_counter()
    views = generate_views(image, model, out, settings)
    seconds_generate = time.perf_counter() - t0
    log(f"[2/2] fusing {views} ({cfg.name})")
    t0 = time.perf_counter()
    fused = fuse_generated(views, out, cfg, log=log)
    seconds_fuse = time.perf_counter() - t0
    write_json_atomic(out / RECORD_FILE, {
        "image": str(Path(image).resolve()), "model": str(Path(model).resolve()), "views": str(views.relative_to(out)),
        "generate": {**{k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
                     "guidance": list(settings.guidance)},
        "fusion_experiment": cfg.name, "fusion_budget": fused.metrics.get("budget"), "seconds_generate": seconds_generate, "seconds_fuse": seconds_fuse})
    sheet = out / "conflict_maps.png" if fused.conflict is not None else None
    return ImageTo3DResult(out, views, fused.meshes, out / "turntable.gif", sheet, fused.metrics, seconds_generate,
                           seconds_fuse)


def summary(result: ImageTo3DResult) -> str:
    """The lines `nova3d image-to-3d` prints at the end."""
    m, r = result.metrics, result
    return "\n".join([
        f"views:         {r.views}",
        f"mesh:          {', '.join(str(p) for p in r.meshes.values())} ({m['vertices']} vertices, {m['faces']} faces)",
        f"turntable:     {r.turntable}",
        f"conflict maps: {r.conflict_maps or 'none (the experiment has no conflict maps)'}",
        f"metrics:       {r.out_dir / 'metrics.json'} (mesh vs views PSNR {m['psnr_mesh_vs_views']:.2f} dB)",
        f"done in {r.seconds_generate + r.seconds_fuse:.0f} s (generate {r.seconds_generate:.0f} s, "
        f"fuse {r.seconds_fuse:.0f} s)"])
