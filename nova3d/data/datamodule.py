"""The LightningDataModule: NOVA3D shards streamed with WebDataset into MultiViewBatch.

Training (DDP- and worker-safe, DESIGN.md §3.9): ranks see disjoint samples — with at least
as many shards as ranks, rank r owns shards r, r+world, ...; with fewer, every rank reads them
all but keeps only the samples at positions r, r+world, ... of each shard. Within its share every
(rank, worker) draws shards with replacement (`ResampledShards`, seeded per rank, worker and
epoch), so no rank runs dry; each rank yields exactly ceil(samples_per_epoch / batch_size) full
batches per epoch (`with_epoch` on the loader), so ranks take the same number of steps and never
wait on each other. Random input view (orbit roll) and random background per sample.
Validation/test: every shard once, split by rank then by worker; no roll, white background.
A rank with no validation shards yields no batches: give at least world_size val shards.

Broken data never crashes a run and is never skipped silently: an unreadable (e.g. truncated)
shard, a sample with a missing key, an undecodable image or a member whose checksum fails is
skipped, counted in shared memory across worker processes (`datamodule.skipped`) and warned
about with its file and reason. Only when every one of the last `max_consecutive_failures` reads
failed does it raise. A shard folder without manifest.json (an interrupted write_shards) is
refused at setup (nova3d.data.manifest.resolve_shards).

Workers hand over compact PackedBatch (stored uint8/uint16 pixels of the picked views: ~3x less
than float32 to move between processes); compositing, resizing and the normal frame are done after
the transfer by `unpack_batch`: in `on_after_batch_transfer` (on the GPU) when a Trainer drives
the loaders, or in the main process when the loaders are iterated without one. Either way the
loaders' consumers see MultiViewBatch. (A LightningModule that overrides on_after_batch_transfer
takes the hook from the DataModule: it must call `unpack_batch` on a PackedBatch itself.)
"""
from __future__ import annotations

import math
import multiprocessing
import warnings
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Iterable, Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds

from nova3d.cameras import NORMAL_FRAMES
from nova3d.config import DataConfig, slurm_cpus_per_task
from nova3d.data.manifest import Manifest, existing_shards, find_manifest
from nova3d.data.sample_error import INVALID, MISSING_KEY, UNDECODABLE, SampleError
from nova3d.data.shards import (ShardReadError, decode_sample, evenly_spaced_views, iter_tar_samples,
                                stored_num_views)
from nova3d.data.views import MultiViewBatch, PackedBatch, PackedViews, Scratch, collate_packed, pack_views, unpack_batch
from nova3d.data import latent_cache
from nova3d.errors import Nova3DError

UNREADABLE_SHARD = "unreadable_shard"
SKIP_REASONS = (UNREADABLE_SHARD, MISSING_KEY, UNDECODABLE, INVALID)
BACKGROUNDS = ("random", "white")


@dataclass
class SkipReport:
    """How many shards/samples were skipped, by reason (nova3d.data.sample_error codes)."""

    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class SkipCounter:
    """Counts skips in shared memory, so DataLoader worker processes add to the same totals."""

    def __init__(self, max_consecutive_failures: int = 200):
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS))  # inherited by forked/spawned workers
        self.max_consecutive_failures = max_consecutive_failures
        self._consecutive = 0  # per process: failures since the last good sample
        self._warned: set[str] = set()  # per process: a resampled broken shard is warned about once

    def skip(self, reason: str, message: str) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += 1
            total = sum(self._counts)
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"nova3d data: skipped [{reason}] {message} ({total} skipped so far)", RuntimeWarning)
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive_failures:
            raise Nova3DError(f"the last {self._consecutive} shard/sample reads all failed; last: {message}")

    def ok(self) -> None:
        self._consecutive = 0

    def report(self) -> SkipReport:
        with self._counts.get_lock():
            return SkipReport(dict(zip(SKIP_REASONS, self._counts[:])))


def _stream_seed(base: int, rank: int) -> int:
    """Seed for this rank/worker/epoch: DataLoader seeds each worker from the (seedable) main RNG."""
    worker = torch.utils.data.get_worker_info()
    drawn = torch.initial_seed() if worker is not None else int(torch.randint(2**62, ()).item())
    return int(np.random.SeedSequence([base, rank, drawn]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class _ToViews:
    """Pipeline stage: raw shard samples -> PackedViews; broken samples are counted and skipped."""

    cfg: DataConfig
    train: bool
    counter: SkipCounter
    rank: int
    epoch: int = 0  # advanced per pass, so persistent workers do not repeat their random choices

    def __call__(self, src: Iterable[dict]) -> Iterator[PackedViews]:
        rng = np.random.default_rng([_stream_seed(self.cfg.seed, self.rank), self.epoch])
        self.epoch += 1
        random_start = self.train and self.cfg.random_start_view
        random_bg = self.train and self.cfg.train_background == "random"
        for raw in src:
            try:
                total = stored_num_views(raw)
                start = int(rng.integers(total)) if random_start else 0
                try:
                    views = evenly_spaced_views(total, self.cfg.num_views, start)
                except Nova3DError as err:
                    raise SampleError(INVALID, f"{raw.get('__url__')}: sample {raw.get('__key__')}: {err}") from err
                obj = decode_sample(raw, views)
                bg = torch.from_numpy(rng.random(3)).float() if random_bg else torch.ones(3)
                sample = pack_views(obj, views, resolution=self.cfg.resolution,
                                    normal_frame=self.cfg.normal_frame, background=bg)
                if self.cfg.use_cached_latents:  # required in training; validation encodes what lacks them
                    cached = latent_cache.decode_latents(raw, views, self.cfg, required=self.train)
                    sample.latent_params = None if cached is None else torch.from_numpy(cached)
            except SampleError as err:
                self.counter.skip(err.reason, str(err))
                continue
            self.counter.ok()
            yield sample


def _read_shards(src: Iterable[dict], counter: SkipCounter, part: tuple[int, int] = (0, 1),
                 max_empty: int | None = None) -> Iterator[dict]:
    """Pipeline stage: {"url"} -> raw samples; a shard that breaks is counted once and left.

    part=(r, n): only the samples at positions r, r+n, ... of each shard. `max_empty`: raise after
    this many shards in a row gave nothing (a resampled stream would otherwise spin forever)."""
    rank, parts = part
    empty, streak = 0, {}  # shard reads in a row that gave nothing; url -> why (None: read, but nothing for us)
    for item in src:
        got, broken = False, None
        try:
            for i, sample in enumerate(iter_tar_samples(item["url"])):
                if i % parts == rank:
                    got = True
                    yield sample
        except ShardReadError as err:
            counter.skip(UNREADABLE_SHARD, str(err))
            broken = str(err)
        if got:
            empty, streak = 0, {}
        else:
            empty += 1
            streak.setdefault(item["url"], broken)
        if max_empty is not None and empty >= max_empty:
            raise Nova3DError(_nothing_read_message(part, empty, streak))


def _nothing_read_message(part: tuple[int, int], reads: int, streak: dict[str, str | None]) -> str:
    """Why `reads` shard reads in a row gave rank part[0] nothing: broken shards, or too few samples."""
    rank, parts = part
    broken = [why for why in streak.values() if why is not None]
    causes = [f"{len(broken)} of {len(streak)} shards unreadable (first: {broken[0]})"] if broken else []
    if len(broken) < len(streak):  # some shards read fine yet gave this rank nothing
        causes.append("fewer training samples than ranks?" if parts > 1 else "the readable shards hold no samples")
    return f"rank {rank} of {parts} got no sample from {reads} shard reads in a row: {'; '.join(causes)}"


def rank_share(urls: list[str], rank: int, world: int) -> tuple[list[str], tuple[int, int]]:
    """This rank's training shards and sample part (see the module doc): disjoint across ranks."""
    if len(urls) >= world:
        return urls[rank::world], (0, 1)
    return urls, (rank, world)


def _unpack_on_cpu(batch: PackedBatch, scratch: Scratch) -> MultiViewBatch:
    """unpack_batch on one thread: beside busy worker processes, OpenMP threads spinning on the
    same cores made it ~6x slower (measured: 3.8 instead of 22 samples/s at 256² on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return unpack_batch(batch, scratch)
    finally:
        torch.set_num_threads(threads)


class _Unpacked:
    """A loader of PackedBatch iterated as MultiViewBatch (unpacked in this process)."""

    def __init__(self, loader: Iterable[PackedBatch], scratch: Scratch):
        self.loader, self.scratch = loader, scratch

    def __iter__(self) -> Iterator[MultiViewBatch]:
        for batch in self.loader:
            yield _unpack_on_cpu(batch, self.scratch)

    def __getattr__(self, name: str):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def _split_by_rank(src: Iterable, rank: int, world_size: int) -> Iterator:
    """Shard list of this rank (rank and world size captured in the main process: workers may not know)."""
    return islice(src, rank, None, world_size)


def resolve_num_workers(cfg: DataConfig) -> int:
    """cfg.num_workers, else SLURM_CPUS_PER_TASK - 1 under SLURM, else 1 (never os.cpu_count())."""
    return cfg.num_workers if cfg.num_workers is not None else max(slurm_cpus_per_task(2) - 1, 0)


def check_data_config(cfg: DataConfig) -> None:
    """Nova3DError naming the first DataConfig field the DataModule cannot honour."""
    checks = [("train_background", cfg.train_background in BACKGROUNDS, f"one of {BACKGROUNDS}"),
              ("normal_frame", cfg.normal_frame in NORMAL_FRAMES, f"one of {NORMAL_FRAMES}"),
              ("num_views", cfg.num_views >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
              ("resolution", cfg.resolution >= 1, ">= 1"), ("samples_per_epoch", cfg.samples_per_epoch >= 1, ">= 1"),
              ("num_workers", cfg.num_workers is None or cfg.num_workers >= 0, ">= 0 or null")]
    for name, ok, wanted in checks:
        if not ok:
            raise Nova3DError(f"data.{name} must be {wanted}, got {getattr(cfg, name)!r}")
    latent_cache.check_config(cfg)


class MultiViewDataModule(L.LightningDataModule):
    """MultiViewBatch loaders for training (resampled, infinite) and validation/test (each shard once)."""

    def __init__(self, cfg: DataConfig):
        super().__init__()
        check_data_config(cfg)
        self.cfg = cfg
        self.num_workers = resolve_num_workers(cfg)
        self._counter: SkipCounter | None = None
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self._scratch = Scratch()  # unpacking on the CPU in this process

    @property
    def batches_per_epoch(self) -> int:
        """Training batches each rank yields per epoch."""
        return math.ceil(self.cfg.samples_per_epoch / self.cfg.batch_size)

    @property
    def skipped(self) -> SkipReport:
        """Shards/samples skipped so far (all workers, this process's loaders)."""
        return self._counter.report() if self._counter else SkipReport({r: 0 for r in SKIP_REASONS})

    def setup(self, stage: str | None = None) -> None:
        """Find the shards (Nova3DError when missing); "validate"/"test" need no training shards."""
        if self._counter is None:  # created here, not at import: shared memory for this process's workers
            self._counter = SkipCounter()
        if stage in (None, "fit"):
            self.train_urls = existing_shards(self.cfg.train_shards, split="train")
            if self.cfg.use_cached_latents:
                latent_cache.check_shards(self.cfg.train_shards, self.cfg)
        self.val_urls = self._find_val_urls()

    def _find_val_urls(self) -> list[str]:
        """cfg.val_shards; else the manifest's "val" split beside the train shards; else the train shards."""
        if self.cfg.val_shards:
            return existing_shards(self.cfg.val_shards, split="val")
        manifest = find_manifest(self.cfg.train_shards)
        if manifest is not None and Manifest.load(manifest).shard_names("val"):
            return existing_shards(manifest, split="val")
        return self.train_urls or existing_shards(self.cfg.train_shards, split="train")

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, pipeline: wds.DataPipeline, num_workers: int) -> wds.WebLoader:
        return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                             persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())

    def _deliver(self, loader: Iterable[PackedBatch]) -> Iterable:
        """PackedBatch loader for a Trainer (unpacked by on_after_batch_transfer), else MultiViewBatch."""
        return loader if self.trainer is not None else _Unpacked(loader, self._scratch)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """PackedBatch -> MultiViewBatch on the device it was moved to (views.unpack_batch)."""
        if isinstance(batch, PackedBatch):
            if batch.rgba.device.type == "cpu":
                return _unpack_on_cpu(batch, self._scratch)
            return unpack_batch(batch)
        return batch

    def train_dataloader(self) -> Iterable[MultiViewBatch]:
        if not self.train_urls:
            self.setup("fit")
        rank, world = self._rank_world()
        urls, part = rank_share(self.train_urls, rank, world)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=self.cfg.seed, deterministic=True,
                                worker_seed=partial(_stream_seed, self.cfg.seed, rank)),
            # 100 x the shard count: a false alarm needs a 1-in-e^100 streak of resampling.
            partial(_read_shards, counter=self._counter, part=part, max_empty=100 * len(urls) + 10),
            wds.shuffle(self.cfg.shuffle_buffer, initial=max(1, self.cfg.shuffle_buffer // 4)),
            _ToViews(self.cfg, train=True, counter=self._counter, rank=rank),
            wds.batched(self.cfg.batch_size, collation_fn=collate_packed, partial=False),
        )
        return self._deliver(self._loader(pipeline, self.num_workers).with_epoch(self.batches_per_epoch))

    def val_dataloader(self) -> Iterable[MultiViewBatch]:
        if not self.val_urls:
            self.setup("validate")
        rank, world = self._rank_world()
        mine = self.val_urls[rank::world]
        if not mine:
            warnings.warn(f"nova3d data: rank {rank} of {world} has no validation shards "
                          f"({len(self.val_urls)} in all)", RuntimeWarning)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_urls),
            partial(_split_by_rank, rank=rank, world_size=world),
            wds.split_by_worker,
            partial(_read_shards, counter=self._counter),
            _ToViews(self.cfg, train=False, counter=self._counter, rank=rank),
            wds.batched(self.cfg.batch_size, collation_fn=collate_packed, partial=True),
        )
        return self._deliver(self._loader(pipeline, min(self.num_workers, len(mine))))

    def test_dataloader(self) -> Iterable[MultiViewBatch]:
        return self.val_dataloader()
