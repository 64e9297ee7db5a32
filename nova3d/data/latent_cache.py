"""Cached VAE latents in shards: their codec, and which training configs may use them.

`data_prep/cache_latents.py` writes them; with `data.use_cached_latents` the DataModule hands
them to the training system in `MultiViewBatch.latent_params`, and `MultiViewDiffusion.target_latents`
samples the targets from them instead of running the VAE encoder on 2·V frames per object.

What is cached, and why that is valid: SVD's VAE encoder works per image, so the latent of a
view depends only on that view's pixels. The DataModule's pixels of a view depend on
  * the resolution (resize before encoding)      -> stored, must equal data.resolution;
  * the background colour (composited RGB, and the normals' background 2·bg − 1)
                                                   -> cached on white; data.train_background=random is refused;
  * the normals' frame: "world" and "view" normals of a view do not depend on which view is the
    input view, but "input_view" normals are rotated into the frame of the (rolled) input view
                                                   -> with normal_frame=input_view, data.random_start_view
                                                      must be false (views then start at stored view 0, the
                                                      frame the cache used); with world/view, rolls are fine;
  * the view subset and roll                      -> every stored view is cached, picked like the images.
The condition image (view 0 + noise augmentation, random per step) is still encoded live: one
image per object. Values are float16 (finer than the images' own 8-bit quantisation); the
channels are the posterior's (mean, logvar), so sampling draws what encoding would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nova3d.data import schema
from nova3d.data.manifest import Manifest, find_manifest
from nova3d.data.sample_error import INVALID, MISSING_KEY, UNDECODABLE, SampleError
from nova3d.data.shards import recorded_crcs, verified_member
from nova3d.errors import Nova3DError

CACHE_SCRIPT = "data_prep/cache_latents.py"


def check_config(cfg) -> None:  # cfg: nova3d.config.DataConfig
    """Nova3DError (one line) when data.use_cached_latents is on with settings the cache cannot serve."""
    if not cfg.use_cached_latents:
        return
    if cfg.train_background != "white":
        raise Nova3DError("data.use_cached_latents needs data.train_background=white: latents of random "
                          "background colours cannot be cached")
    if cfg.random_start_view and cfg.normal_frame == "input_view":
        raise Nova3DError("data.use_cached_latents with data.normal_frame=input_view needs "
                          "data.random_start_view=false: rolled input views change the normals' pixels "
                          "(use normal_frame=world or view to keep random rolls)")


def info_mismatch(info: dict, cfg) -> Optional[str]:
    """Why latents described by `info` (LatentCacheInfo fields) do not fit DataConfig `cfg`, or None."""
    if info.get("format") != schema.LATENT_CACHE_FORMAT or info.get("version") != schema.LATENT_CACHE_VERSION:
        return f"latent cache format {info.get('format')!r} v{info.get('version')} is not " \
               f"{schema.LATENT_CACHE_FORMAT!r} v{schema.LATENT_CACHE_VERSION}"
    if info.get("resolution") != cfg.resolution:
        return f"latents were cached at resolution {info.get('resolution')}, data.resolution is {cfg.resolution}"
    if info.get("normal_frame") != cfg.normal_frame:
        return f"latents were cached with normal_frame {info.get('normal_frame')!r}, " \
               f"data.normal_frame is {cfg.normal_frame!r}"
    return None


def manifest_info(spec: str) -> tuple[Optional[Path], Optional[dict]]:
    """(manifest path, its encoding.latent_cache) of a shard spec; (None, None) without a manifest."""
    path = find_manifest(spec)
    if path is None:
        return None, None
    return path, Manifest.load(path).encoding.get("latent_cache")


def check_shards(spec: str, cfg) -> None:
    """Nova3DError when the manifest beside `spec` says its shards have no latents, or unfitting ones.

    Shards named without a manifest (a list file, single tars) are checked per sample instead."""
    path, info = manifest_info(spec)
    if path is None:
        return
    if info is None:
        raise Nova3DError(f"{path}: these shards have no cached latents (write them with {CACHE_SCRIPT}) "
                          "but data.use_cached_latents is true")
    why = info_mismatch(info, cfg)
    if why:
        raise Nova3DError(f"{path}: {why}")


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the weights that make the posterior: encoder + quant_conv."""
    digest = hashlib.sha256()
    state = vae.state_dict()
    for name in sorted(k for k in state if k.startswith(("encoder.", "quant_conv."))):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_vae(specs: list[str], vae: torch.nn.Module) -> None:
    """Nova3DError when the latents of any manifest among `specs` come from another VAE than `vae`."""
    mine = None
    for spec in specs:
        path, info = manifest_info(spec)
        if info is None:
            continue
        mine = mine or vae_fingerprint(vae)
        if info.get("vae_fingerprint") != mine:
            raise Nova3DError(f"{path}: latents were cached with another VAE ({info.get('source') or '?'}, "
                              f"fingerprint {info.get('vae_fingerprint')}) than this model's ({mine}); "
                              f"re-run {CACHE_SCRIPT} with this model")


def encode_params(params: torch.Tensor) -> bytes:
    """Posterior parameters [V, 2*C, h, w] -> float16 .npy bytes (a shard value)."""
    x = params.detach().float().cpu()
    if not torch.isfinite(x).all() or x.abs().max() > np.finfo(np.float16).max:
        raise ValueError("latent parameters are not finite or exceed the float16 range")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x.numpy().astype(np.float16)), allow_pickle=False)
    return buf.getvalue()


def sample_info(info: schema.LatentCacheInfo) -> bytes:
    return json.dumps(dataclasses.asdict(info)).encode()


def decode_latents(raw: dict, views: list[int], cfg, required: bool) -> Optional[np.ndarray]:
    """[D, len(views), 2*C, h, w] float16 (domains in schema.LATENT_DOMAINS order) of a shard sample.

    A sample without latents: SampleError(MISSING_KEY) when `required`, else None (encoded live).
    Latents that do not fit `cfg`, fail their crc32 (schema.KEY_CRC) or do not decode:
    SampleError(INVALID / UNDECODABLE).
    """
    name = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    keys = [schema.KEY_LATENT_INFO, *schema.LATENT_KEYS.values()]
    missing = [k for k in keys if k not in raw]
    if missing:
        if not required:
            return None
        raise SampleError(MISSING_KEY, f"{name}: missing {', '.join(missing)} (no cached latents; "
                                       f"see {CACHE_SCRIPT})")
    crcs = recorded_crcs(raw, name)
    try:
        info = json.loads(verified_member(raw, schema.KEY_LATENT_INFO, crcs, name))
        arrays = [np.load(io.BytesIO(verified_member(raw, schema.LATENT_KEYS[d], crcs, name)), allow_pickle=False)
                  for d in schema.LATENT_DOMAINS]
    except SampleError:
        raise
    except Exception as err:  # JSON and npy errors both mean "cannot decode this entry"
        raise SampleError(UNDECODABLE, f"{name}: cached latents: {type(err).__name__}: {err}") from err
    why = info_mismatch(info, cfg)
    if why:
        raise SampleError(INVALID, f"{name}: {why}")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 4 or arrays[0].dtype != np.float16 or max(views) >= arrays[0].shape[0]:
        raise SampleError(INVALID, f"{name}: cached latents have shapes {sorted(shapes)} "
                                   f"{arrays[0].dtype}, need [V, 2C, h, w] float16 for views {views}")
    return np.stack([a[views] for a in arrays])
