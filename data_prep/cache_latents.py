"""Cache the frozen VAE's latents in shards: a copy of a shard folder whose samples also carry them.

    python -m data_prep.cache_latents SHARDS --out DIR --experiment EXP [key=value ...] [--device auto]

SHARDS is a folder written by data_prep.write_shards (with its manifest.json). Every sample is
copied with its keys unchanged (crc32.json aside), plus the VAE posterior (mean, logvar; float16) of every stored
view of its RGB and normal videos (nova3d.data.schema, "Cached VAE latents"), and crc32.json
gains their crc32s (the read path checks them). The latents are made from the pixels
the DataModule gives the model: resized to data.resolution, composited on white, normals in
data.normal_frame of the stored orbit (view 0 = input view). The VAE is the experiment's, as
training builds it: model.pretrained's folder, or the seeded random model.architecture (tiny).
Train on the copy with `data.use_cached_latents=true`; nova3d.data.latent_cache says which data
settings can use cached latents (white training background; with input-view normals, no orbit
roll) and checks resolution, normal frame and VAE (a weight fingerprint) before training.

Shards keep their names and are written under a temporary name, then renamed; manifest.json (the
input's, with new sizes and checksums and `encoding.latent_cache`) is written last. Samples that
do not decode are left out and listed in the manifest's `rejected`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm
from webdataset import TarWriter

from nova3d.config import ExperimentConfig, load_experiment
from nova3d.data import schema
from nova3d.data.inspect import file_sha256
from nova3d.data.latent_cache import check_config, encode_params, sample_info, vae_fingerprint
from nova3d.data.manifest import Manifest, ShardInfo, find_manifest
from nova3d.data.sample_error import SampleError
from nova3d.data.shards import decode_sample, iter_tar_samples, recorded_crcs, with_member_crcs
from nova3d.data.views import composite, pack_views
from nova3d.devices import resolve_device
from nova3d.errors import Nova3DError
from nova3d.models.conditioning import Conditioner, load_conditioning

TAR_MTIME = 0  # as data_prep.write_shards: the same input gives byte-identical shards
VAE_CHUNK = 16  # images per encoder call


def build_conditioner(cfg: ExperimentConfig) -> tuple[Conditioner, str]:
    """The frozen CLIP + VAE a training run of `cfg` builds (nova3d.models.factory), and its source."""
    from nova3d.models.factory import ARCHITECTURES

    m = cfg.model
    if m.pretrained:
        return load_conditioning(m.pretrained), str(m.pretrained)
    arch = ARCHITECTURES.get(m.architecture)
    if arch is None:
        raise Nova3DError(f"model.architecture must be one of {sorted(ARCHITECTURES)}, got {m.architecture!r}")
    with torch.random.fork_rng(devices=[]):  # builders seed the global RNG; keep the caller's
        return arch.build_conditioner(cfg.seed), f"random:{m.architecture}:{cfg.seed}"


@torch.no_grad()
def sample_latents(raw: dict, cfg: ExperimentConfig, cond: Conditioner) -> dict[str, torch.Tensor]:
    """{domain: [V, 2*C, h, w] posterior parameters} of every stored view of a raw shard sample."""
    obj = decode_sample(raw)
    views = list(range(len(obj.cameras)))
    p = pack_views(obj, views, resolution=cfg.data.resolution, normal_frame=cfg.data.normal_frame,
                   background=torch.ones(3))
    rgb, normals, _ = composite(p.rgba, p.normal, p.mask, p.rot, p.background, p.resolution)
    videos = {"rgb": rgb * 2 - 1, "normal": normals}  # as MultiViewDiffusion's DOMAIN_VIDEOS
    out = {}
    for domain in schema.LATENT_DOMAINS:
        frames = videos[domain]
        frames = frames.to(cond.vae.device, cond.vae.dtype)
        chunks = [cond.vae.encode(frames[i : i + VAE_CHUNK]).latent_dist.parameters
                  for i in range(0, frames.shape[0], VAE_CHUNK)]
        out[domain] = torch.cat(chunks).float().cpu()
    return out


def cache_latents(shards: str | os.PathLike, out: str | os.PathLike, cfg: ExperimentConfig,
                  device: str = "cpu", progress: bool = True) -> Path:
    """Copy the shard folder `shards` to `out` with cached latents; returns the new manifest's path."""
    try:  # fail now, not at training time, when the experiment's data settings cannot use a cache
        check_config(dataclasses.replace(cfg.data, use_cached_latents=True))
    except Nova3DError as err:
        raise Nova3DError(f"experiment {cfg.name}: {err}") from err
    manifest_path = find_manifest(shards)
    if manifest_path is None:
        raise Nova3DError(f"{shards}: no manifest.json (give a folder written by data_prep.write_shards)")
    manifest = Manifest.load(manifest_path)
    src, out = manifest_path.parent, Path(out)
    if out.resolve() == src.resolve():
        raise Nova3DError(f"{out}: write the cached copy to another folder than its source")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"*{schema.SHARD_EXT}"))
    if stale:
        raise Nova3DError(f"{out}: already holds shards ({stale[0].name}, ...); use an empty folder")
    cond, source = build_conditioner(cfg)
    cond = cond.to(device)
    info = schema.LatentCacheInfo(resolution=cfg.data.resolution, normal_frame=cfg.data.normal_frame,
                                  vae_fingerprint=vae_fingerprint(cond.vae), scaling_factor=cond.scaling_factor,
                                  source=source)
    info_bytes = sample_info(info)
    shard_infos, rejected = [], list(manifest.rejected)
    bar = tqdm(total=sum(s.num_samples for s in manifest.shards), desc="caching latents", unit="obj",
               disable=not progress)
    for shard in manifest.shards:
        final, tmp = out / shard.name, out / (shard.name + schema.TMP_SUFFIX)
        kept = []
        try:
            with open(tmp, "wb") as f:
                tar = TarWriter(f, encoder=False, mtime=TAR_MTIME)
                for raw in iter_tar_samples(str(src / shard.name)):
                    try:
                        latents = sample_latents(raw, cfg, cond)
                    except SampleError as err:
                        rejected.append({"object_id": raw["__key__"], "path": str(src / shard.name),
                                         "reason": err.reason, "detail": str(err)})
                        continue
                    finally:
                        bar.update()
                    added = {schema.LATENT_KEYS[d]: encode_params(t) for d, t in latents.items()}
                    added[schema.KEY_LATENT_INFO] = info_bytes
                    sample = {k: v for k, v in raw.items() if not k.startswith("__") and k not in added}
                    # Kept members keep their recorded crc32 (still checked against the writer's);
                    # the added ones, and every member of a shard written without KEY_CRC, get one now.
                    kept_crcs = {k: c for k, c in recorded_crcs(raw, raw["__key__"]).items() if k in sample}
                    tar.write({"__key__": raw["__key__"], **with_member_crcs({**sample, **added}, kept_crcs)})
                    kept.append(raw["__key__"])
                tar.close()
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        shard_infos.append(ShardInfo(shard.name, shard.split, len(kept), final.stat().st_size, file_sha256(final), kept))
    bar.close()
    splits = {name: {**split, "num_samples": sum(s.num_samples for s in shard_infos if s.split == name)}
              for name, split in manifest.splits.items()}
    new = dataclasses.replace(manifest, shards=shard_infos, splits=splits, rejected=rejected,
                              encoding={**manifest.encoding, "latent_cache": dataclasses.asdict(info)})
    return new.save(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cache_latents", description=__doc__.split("\n")[0])
    parser.add_argument("shards", help="shard folder with manifest.json (data_prep.write_shards output)")
    parser.add_argument("--out", required=True, help="folder for the copy with latents (empty or new)")
    parser.add_argument("--experiment", required=True,
                        help="the experiment to train with (its model gives the VAE, its data the resolution "
                             "and normal frame), e.g. tiny or gta_full")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for nova3d.train")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        cfg = load_experiment(args.experiment, args.overrides)
        path = cache_latents(args.shards, args.out, cfg, device=resolve_device(args.device))
    except Nova3DError as err:
        print(f"cache_latents: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
