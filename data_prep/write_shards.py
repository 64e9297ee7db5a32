"""Pack rendered object folders into WebDataset tar shards plus a manifest.json.

    python -m data_prep.write_shards RENDER_DIR --out DIR [--max-count N] [--max-size BYTES]
                                    [--prefix train] [--val-fraction F] [--zstd-level L]

Every sub-folder of RENDER_DIR that looks like an object folder (nova3d.data.schema) is read
and checked; broken ones (missing files, unreadable images, wrong sizes, NaN cameras) are
rejected with a reason in manifest.json instead of packed; when every object is rejected the
command exits 2. Shards are `<prefix>-000000.tar`, ... (and `val-000000.tar`, ... with
--val-fraction), each written under a temporary name and renamed when complete, so a shard with
its final name is whole. manifest.json is written last: a folder of shards without one is
incomplete, and readers (the DataModule, inspect-shards) refuse it.

A rerun resumes or redoes: it keeps the shards when the manifest lists exactly RENDER_DIR's
objects (in the same splits, with the same encoding) and every shard is there at its recorded
size; otherwise it deletes the manifest first (so an interrupted rewrite is visibly incomplete),
then the old shards and any half-written ones, and packs again. (--update, which asked for this
before it was the default, is still accepted.)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm
from webdataset import TarWriter

from nova3d.atomic import check_writable
from nova3d.data import schema
from nova3d.data.manifest import Manifest, ShardInfo
from nova3d.data.sample_error import INVALID, SampleError
from nova3d.data.shards import encode_sample, read_object_folder
from nova3d.errors import Nova3DError
from nova3d.signals import exit_code, interrupts_as_errors

VAL_PREFIX = "val"
TAR_MTIME = 0  # fixed member times: the same objects always give byte-identical shards


@dataclass
class Rejected:
    object_id: str
    path: str
    reason: str  # nova3d.data.sample_error reason code
    detail: str


@dataclass
class ShardSummary:
    """What write_shards did."""

    out_dir: Path
    manifest: Path
    shards: list[ShardInfo]
    rejected: list[Rejected] = field(default_factory=list)
    up_to_date: bool = False  # found the shards current and wrote nothing

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


class _HashingFile:
    """A write-only file that also computes sha256 and counts bytes as they are written."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class _ShardSeries:
    """Shards `<prefix>-NNNNNN.tar` of one split, cut by sample count and size."""

    def __init__(self, out_dir: Path, prefix: str, split: str, max_count: int, max_size: int):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.max_count, self.max_size = max_count, max_size
        self.done: list[ShardInfo] = []
        self._file: _HashingFile | None = None
        self._tar: TarWriter | None = None
        self._objects: list[str] = []

    def _tmp_path(self) -> Path:
        return self.out_dir / (schema.shard_name(self.prefix, len(self.done)) + schema.TMP_SUFFIX)

    def write(self, sample: dict) -> None:
        size = sum(len(v) + 512 for k, v in sample.items() if not k.startswith("__"))  # + tar headers
        full = self._tar is not None and (len(self._objects) >= self.max_count
                                          or (self._objects and self._file.size + size > self.max_size))
        if full:
            self.finish()
        if self._tar is None:
            self._file = _HashingFile(self._tmp_path())
            self._tar = TarWriter(self._file, encoder=False, mtime=TAR_MTIME)
        self._tar.write(sample)
        self._objects.append(sample["__key__"])

    def finish(self) -> None:
        """Complete the open shard: close, fsync, then rename it to its final name."""
        if self._tar is None:
            return
        self._tar.close()  # writes the tar end-of-archive blocks through _file
        self._file.close()
        name = schema.shard_name(self.prefix, len(self.done))
        os.replace(self._tmp_path(), self.out_dir / name)
        self.done.append(ShardInfo(name, self.split, len(self._objects), self._file.size,
                                   self._file.sha256.hexdigest(), self._objects))
        self._tar, self._file, self._objects = None, None, []

    def abort(self) -> None:
        """Drop the open shard (after an error): no file with a final name is left half-written."""
        if self._file is not None:
            try:
                self._tar.close()  # else tarfile flushes into the closed file when collected
            finally:
                self._file.close()
                self._tmp_path().unlink(missing_ok=True)
        self._tar, self._file, self._objects = None, None, []


def find_object_folders(render_dir: Path) -> list[Path]:
    """Sub-folders that are, or were meant to be, object folders (skipping `*.partial`)."""
    found = []
    for path in sorted(render_dir.iterdir()):
        if not path.is_dir() or path.name.endswith(schema.TMP_SUFFIX):
            continue
        if any((path / name).exists() for name in (schema.META_FILE, schema.CAMERAS_FILE, schema.RGB_DIR)):
            found.append(path)
    return found


def _val_ids(object_ids: list[str], fraction: float) -> set[str]:
    """A stable validation subset: the ids with the smallest hashes (independent of order)."""
    if fraction <= 0 or len(object_ids) < 2:
        return set()
    count = min(max(1, round(fraction * len(object_ids))), len(object_ids) - 1)
    ranked = sorted(object_ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    return set(ranked[:count])


def _current_manifest(out_dir: Path, folders: list[Path], val_ids: set[str], split: str,
                      encoding: schema.ShardEncoding) -> Manifest | None:
    """The manifest of `out_dir` if its shards are what a rerun would write: exactly `folders`'
    objects, `val_ids` in "val" and the rest in `split`, with `encoding`, every shard there at its
    recorded size and no other shard."""
    try:
        manifest = Manifest.load(out_dir / schema.MANIFEST_FILE)
    except Nova3DError:  # none, or unreadable
        return None
    listed = [o for s in manifest.shards for o in s.objects] + [r["object_id"] for r in manifest.rejected]
    if sorted(listed) != sorted(f.name for f in folders) or manifest.encoding != asdict(encoding):
        return None
    if any((VAL_PREFIX if o in val_ids else split) != s.split for s in manifest.shards for o in s.objects):
        return None
    on_disk = {p.name: p.stat().st_size for p in out_dir.glob(f"*{schema.SHARD_EXT}")}
    return manifest if on_disk == {s.name: s.num_bytes for s in manifest.shards} else None


def _clear_stale(out_dir: Path) -> None:
    """Delete the manifest first (the folder is then visibly incomplete), then the shards and any
    half-written `*.tar.partial` an interrupted run left."""
    (out_dir / schema.MANIFEST_FILE).unlink(missing_ok=True)
    for path in [*out_dir.glob(f"*{schema.SHARD_EXT}"), *out_dir.glob(f"*{schema.SHARD_EXT}{schema.TMP_SUFFIX}")]:
        path.unlink()


def write_shards(render_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_count: int = 1000,
                 max_size: int = 2 * 1024**3, prefix: str = "train", val_fraction: float = 0.0,
                 encoding: schema.ShardEncoding = schema.ShardEncoding(), split: str = "train",
                 update: bool = True, progress: bool = True) -> ShardSummary:
    """Pack every complete object folder of `render_dir` into shards in `out_dir`.

    split: the manifest's name of the main series (what DataModules look up; "val"/"test" for a
    folder of one held-out split). update: keep current shards, rewrite stale ones (module doc);
    False refuses a folder that already holds shards."""
    render_dir, out_dir = Path(render_dir), Path(out_dir)
    if not render_dir.is_dir():
        raise Nova3DError(f"{render_dir}: not a folder")
    if max_count < 1 or max_size < 1:
        raise Nova3DError("--max-count and --max-size must be positive")
    if prefix == VAL_PREFIX and val_fraction > 0:
        raise Nova3DError(f"--prefix {VAL_PREFIX!r} is reserved for the validation split")
    if split == VAL_PREFIX and val_fraction > 0:
        raise Nova3DError("--val-fraction splits off a validation set: the main split cannot be 'val' too")
    if out_dir.exists() and not out_dir.is_dir():
        raise Nova3DError(f"--out {out_dir}: is a file, not a folder")
    check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = find_object_folders(render_dir)
    if not folders:
        raise Nova3DError(f"{render_dir}: no object folders found")
    stale = sorted(out_dir.glob(f"*{schema.SHARD_EXT}"))
    if stale and not update:
        raise Nova3DError(f"{out_dir}: already holds shards ({stale[0].name}, ...); use an empty folder")
    val_ids = _val_ids([f.name for f in folders], val_fraction)
    current = _current_manifest(out_dir, folders, val_ids, split, encoding)
    if current is not None:
        return ShardSummary(out_dir, out_dir / schema.MANIFEST_FILE, current.shards,
                            [Rejected(**r) for r in current.rejected], up_to_date=True)
    _clear_stale(out_dir)
    series = {split: _ShardSeries(out_dir, prefix, split, max_count, max_size)}
    if split != VAL_PREFIX:
        series[VAL_PREFIX] = _ShardSeries(out_dir, VAL_PREFIX, VAL_PREFIX, max_count, max_size)
    rejected: list[Rejected] = []
    packed: dict[str, Path] = {}  # sample key -> folder: keys must be unique
    try:
        for folder in tqdm(folders, desc="packing objects", unit="obj", disable=not progress):
            try:
                sample = encode_sample(read_object_folder(folder), encoding)
                if sample["__key__"] in packed:
                    raise SampleError(INVALID, f"{folder}: object id {sample['__key__']!r} already packed "
                                               f"from {packed[sample['__key__']]}")
            except SampleError as err:
                rejected.append(Rejected(folder.name, str(folder), err.reason, str(err)))
                continue
            packed[sample["__key__"]] = folder
            series["val" if folder.name in val_ids else split].write(sample)
        for s in series.values():
            s.finish()
    except BaseException:
        for s in series.values():
            s.abort()
        raise
    shards = [info for s in series.values() for info in s.done]
    splits = {name: {"pattern": schema.shard_pattern(s.prefix, len(s.done)), "num_shards": len(s.done),
                     "num_samples": sum(i.num_samples for i in s.done)}
              for name, s in series.items() if s.done}
    manifest = Manifest(encoding=asdict(encoding), shards=shards, splits=splits,
                        rejected=[asdict(r) for r in rejected], render_dir=str(render_dir))
    return ShardSummary(out_dir, manifest.save(out_dir), shards, rejected)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.write_shards", description=__doc__.split("\n")[0])
    parser.add_argument("render_dir", help="folder of object folders (data_prep.render_views output)")
    parser.add_argument("--out", required=True,
                        help="folder for the shards and manifest.json (new, empty, or an earlier run's)")
    parser.add_argument("--max-count", type=int, default=1000, help="objects per shard at most")
    parser.add_argument("--max-size", type=int, default=2 * 1024**3, help="bytes per shard at most")
    parser.add_argument("--prefix", default="train", help="shard name prefix of the training split")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of objects for val-*.tar")
    parser.add_argument("--split", default="train", help="manifest split name of the shards (train, val, test)")
    parser.add_argument("--zstd-level", type=int, default=schema.ShardEncoding.level)
    parser.add_argument("--update", action="store_true",  # the default now: accepted so old commands work
                        help="(the default) a rerun keeps current shards and rewrites stale ones")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        with interrupts_as_errors():  # SIGTERM/SIGINT: one line and 128 + signal, like any error
            summary = write_shards(args.render_dir, args.out, max_count=args.max_count, max_size=args.max_size,
                                   prefix=args.prefix, val_fraction=args.val_fraction,
                                   encoding=schema.ShardEncoding(level=args.zstd_level), split=args.split,
                                   progress=not args.no_progress)
    except Nova3DError as err:
        print(f"write_shards: error: {err}", file=sys.stderr)
        return exit_code(err)
    for r in summary.rejected:
        print(f"rejected {r.object_id} [{r.reason}]: {r.detail}", file=sys.stderr)
    if not summary.shards:  # every object folder was rejected: nothing to train on is a failure
        first = summary.rejected[0]
        print(f"write_shards: error: {args.render_dir}: all {len(summary.rejected)} objects rejected, none packed "
              f"(first: {first.object_id} [{first.reason}]: {first.detail})", file=sys.stderr)
        return 2
    if summary.up_to_date:
        print(f"{summary.out_dir}: up to date ({summary.num_samples} objects in {len(summary.shards)} shards); "
              "nothing written")
        return 0
    per_split = {name: sum(s.num_samples for s in summary.shards if s.split == name) for name in (args.split, "val")}
    print(f"wrote {summary.num_samples} objects ({per_split[args.split]} {args.split}, {per_split['val']} val) in "
          f"{len(summary.shards)} shards to {summary.out_dir} ({len(summary.rejected)} rejected); "
          f"manifest: {summary.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
