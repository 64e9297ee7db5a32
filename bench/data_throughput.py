"""Data pipeline throughput: samples/s of the MultiViewDataModule, and the shard encodings compared.

    python bench/data_throughput.py [--quick]

Synthetic object folders (tests/helpers_objects.py: 16 views, RGB + 16-bit normals + masks)
are written to a temporary folder, packed with data_prep.write_shards, then streamed through
the real training loader (16 views, batch 1) at 256² and 512² with 1 and 2 workers.
Every timed figure is the median of repeats: loader rates over consecutive windows of batches
from one warmed-up loader, per-call times of the decode/encode steps (after one warm-up call).
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tests/ helpers

from data_prep.write_shards import write_shards  # noqa: E402
from nova3d.config import DataConfig  # noqa: E402
from nova3d.data.datamodule import MultiViewDataModule  # noqa: E402
from nova3d.data.png import encode_png16  # noqa: E402
from nova3d.data.shards import _decode_array, _encode_array, read_object_folder  # noqa: E402
from nova3d.data import schema  # noqa: E402
from tests.helpers_objects import make_object_folder  # noqa: E402

VIEWS = 16


def blender_seconds_per_object(resolution: int) -> tuple[float | None, str | None]:
    """Hook for the Blender renderer's cost: (seconds per 16-view object, None) or (None, why not).

    Renders one procedural object with data_prep.render_views.render_objects (written
    separately: adjust this call if its API changes) and returns its measured wall time.
    """
    try:
        from data_prep.render_io import RenderSettings, collect_sources
        from data_prep.render_views import render_objects
    except ImportError as err:
        return None, f"data_prep.render_views.render_objects is not importable ({err})"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = render_objects(collect_sources([], procedural=["mug"]), tmp,
                                     RenderSettings(views=VIEWS, resolution=resolution), progress=False)
        if summary.failed or not summary.seconds:
            return None, f"render_objects rendered nothing: {summary.failed}"
        return statistics.median(summary.seconds.values()), None
    except Exception as err:  # a hook: report why, never fail the benchmark
        return None, f"render_objects failed: {type(err).__name__}: {err}"


def _make_shards(root: Path, resolution: int, count: int) -> tuple[Path, float, float]:
    """Object folders + shards; returns (shard dir, writer seconds per object, bytes per sample)."""
    for i in range(count):
        make_object_folder(root / "renders", f"obj{i}", views=VIEWS, res=resolution, seed=i, noise=0.03)
    start = time.perf_counter()
    summary = write_shards(root / "renders", root / "shards", max_count=max(count // 2, 1), progress=False)
    seconds = (time.perf_counter() - start) / count
    return root / "shards", seconds, sum(s.num_bytes for s in summary.shards) / summary.num_samples


def loader_samples_per_second(shards: Path, resolution: int, workers: int, batches: int, repeats: int,
                              packed: bool = False) -> float:
    """Training loader throughput (16 views, batch 1), after the workers have started: MultiViewBatch
    unpacked on the CPU in this process, or (packed) the PackedBatch a Trainer gets, to be unpacked
    by on_after_batch_transfer on its device. The median over `repeats` consecutive windows of
    `batches` batches (windows, not single batches: prefetched batches arrive in bursts)."""
    cfg = DataConfig(train_shards=str(shards), resolution=resolution, num_views=VIEWS, batch_size=1,
                     num_workers=workers, samples_per_epoch=batches * repeats + 2 * workers + 2, shuffle_buffer=4)
    dm = MultiViewDataModule(cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(getattr(loader, "loader", loader) if packed else loader)
    for _ in range(2 * workers + 2):  # warm-up: worker start and the first samples of each
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches / (time.perf_counter() - start))
    return statistics.median(rates)


def worker_compute_samples_per_second(shards: Path, resolution: int, repeat: int) -> dict:
    """One worker's own work per sample on one thread, without the loader: decode_sample and
    make_views (roll, composite, normal frame). Batching into shared memory and the transfer
    to the main process come on top (the loader figures include them)."""
    from nova3d.data.shards import decode_sample, iter_tar_samples
    from nova3d.data.views import Scratch, make_views

    torch.set_num_threads(1)
    raw = next(iter_tar_samples(str(sorted(shards.glob("*.tar"))[0])))
    views, scratch = [(5 + k) % VIEWS for k in range(VIEWS)], Scratch()
    parts = {"decode_ms": lambda: decode_sample(raw, views)}
    obj = parts["decode_ms"]()
    parts["make_views_ms"] = lambda: make_views(obj, views, resolution=resolution, normal_frame="input_view",
                                                background=torch.rand(3), scratch=scratch)
    out = {name: round(1000 * _timed(fn, repeat), 1) for name, fn in parts.items()}
    out["samples_per_s"] = round(1000 / sum(out.values()), 2)
    return out


def _timed(fn, repeat: int) -> float:
    """Median seconds of one fn() call over `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoding_comparison(folder: Path, repeat: int) -> dict:
    """Bytes and single-core decode ms of one object's 16 views (RGBA8 + RGB16 normals + mask) per encoding."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_png

    torch.set_num_threads(1)
    obj = read_object_folder(folder)
    arrays = [obj.rgba, obj.normal, obj.mask]

    def png8(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    hwc = [a.transpose(0, 2, 3, 1) for a in (obj.rgba, obj.normal)]  # PNGs are interleaved
    pngs = [png8(v) for v in hwc[0]] + [encode_png16(v) for v in hwc[1]] + [png8(v) for v in obj.mask]
    results = {"png_per_view": (pngs, lambda: [decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8),
                                                          mode=ImageReadMode.UNCHANGED) for b in pngs])}
    for name, filt in (("zstd_raw", schema.NO_FILTER), ("zstd_row_delta", schema.ROW_DELTA)):
        enc = schema.ShardEncoding(filter=filt)
        blobs = [_encode_array(a, enc) for a in arrays]
        results[name] = (blobs, lambda blobs=blobs, filt=filt: [_decode_array(b, filt, None) for b in blobs])
    return {name: {"bytes": sum(len(b) for b in blobs), "decode_ms": round(1000 * _timed(dec, repeat), 1)}
            for name, (blobs, dec) in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few objects and batches (about a minute)")
    args = parser.parse_args(argv)
    objects, batches, repeat = (3, 3, 3) if args.quick else (8, 8, 5)
    figures: dict = {"views": VIEWS, "domains": ["rgb", "normal", "mask"], "quick": args.quick,
                     "statistic": f"median of {repeat} repeats", "loader_batches_per_repeat": batches,
                     "encoding": dataclasses.asdict(schema.ShardEncoding()), "torch_threads": torch.get_num_threads(),
                     "samples_per_s": {}, "write_s_per_object": {}, "bytes_per_sample": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for res in (256, 512):
            shards, write_s, size = _make_shards(Path(tmp) / str(res), res, objects)
            figures["write_s_per_object"][res] = round(write_s, 3)
            figures["bytes_per_sample"][res] = int(size)
            figures["samples_per_s"][res] = {}
            threads = torch.get_num_threads()
            figures.setdefault("one_worker_compute", {})[res] = worker_compute_samples_per_second(shards, res, repeat)
            torch.set_num_threads(threads)
            print(f"{res}²  one worker's compute: {figures['one_worker_compute'][res]}", flush=True)
            for workers in (1, 2):
                rate = loader_samples_per_second(shards, res, workers, batches, repeat)
                figures["samples_per_s"][res][workers] = round(rate, 2)
                print(f"{res}²  {workers} worker(s): {rate:6.2f} samples/s", flush=True)
                rate = loader_samples_per_second(shards, res, workers, batches, repeat, packed=True)
                figures.setdefault("packed_samples_per_s", {}).setdefault(res, {})[workers] = round(rate, 2)
                print(f"{res}²  {workers} worker(s): {rate:6.2f} samples/s packed (unpacked on the device)",
                      flush=True)
            if res == 512:
                figures["encodings_512"] = encoding_comparison(Path(tmp) / "512" / "renders" / "obj0", repeat)
                for name, row in figures["encodings_512"].items():
                    print(f"512² {name:15s} {row['bytes'] / 1e6:6.2f} MB  decode {row['decode_ms']:6.1f} ms")
    figures["blender_seconds_per_object"] = {}
    for res in (256,) if args.quick else (256, 512):
        seconds, why = blender_seconds_per_object(res)
        figures["blender_seconds_per_object"][res] = seconds
        if why:
            figures["blender_error"] = why
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
