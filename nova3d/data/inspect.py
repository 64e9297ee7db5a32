"""`nova3d inspect-shards PATH`: samples, keys and shapes per shard, checked against manifest.json.

Reads every shard with the DataModule's tar reader so that a problem names its file precisely:
truncated or unreadable tars, samples with missing keys, undecodable images or member checksum
failures, sha256 or count mismatches with the manifest, a folder of shards without a manifest
(an interrupted write_shards). `InspectReport.ok` is False when there is any problem.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nova3d.data import schema
from nova3d.data.manifest import IncompleteShardsError, Manifest, ShardInfo, find_manifest, resolve_shards
from nova3d.data.sample_error import SampleError
from nova3d.data.shards import ShardReadError, decode_sample, iter_tar_samples
from nova3d.errors import Nova3DError


@dataclass
class ShardReport:
    path: str
    num_samples: int = 0  # complete, decodable samples
    shapes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # key -> "shape dtype" counts
    checksum: str = "no manifest"  # "ok", "MISMATCH", "not in manifest" or "no manifest"


@dataclass
class InspectReport:
    shards: list[ShardReport]
    problems: list[str]  # one line per problem, naming the file
    manifest: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def render(self) -> str:
        lines = [f"manifest: {self.manifest or 'none'}"]
        for s in self.shards:
            lines.append(f"{Path(s.path).name}: {s.num_samples} samples, checksum {s.checksum}")
            for key in sorted(s.shapes):
                lines.append(f"    {key:16s} " + ", ".join(f"{d} x{n}" for d, n in sorted(s.shapes[key].items())))
        lines.append(f"total: {len(self.shards)} shards, {self.num_samples} samples, {len(self.problems)} problems")
        lines += [f"PROBLEM {p}" for p in self.problems]
        return "\n".join(lines)


def _describe(key: str, sample) -> str:
    array = {schema.KEY_RGB: sample.rgba, schema.KEY_NORMAL: sample.normal, schema.KEY_MASK: sample.mask,
             schema.KEY_DEPTH: sample.depth}.get(key)
    return "json" if array is None else f"[{','.join(map(str, array.shape))}] {array.dtype}"


def _check_sample(path: str, raw: dict, decode: bool, report: ShardReport, problems: list[str]) -> None:
    if not decode:
        missing = [k for k in schema.SHARD_REQUIRED_KEYS if k not in raw]
        if missing:
            problems.append(f"{path}: sample {raw['__key__']}: missing {', '.join(missing)} [missing_key]")
            return
        sample = None
    else:
        try:
            sample = decode_sample(raw)
        except SampleError as err:
            problems.append(f"{err} [{err.reason}]")
            return
    report.num_samples += 1
    for key in raw:
        if not key.startswith("__"):
            report.shapes[key][_describe(key, sample) if sample else f"{len(raw[key])} bytes"] += 1


def _inspect_tar(path: str, decode: bool, problems: list[str]) -> ShardReport:
    report = ShardReport(path)
    try:
        for raw in iter_tar_samples(path):
            _check_sample(path, raw, decode, report, problems)
    except ShardReadError as err:
        problems.append(str(err))
    return report


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (manifest checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inspect_shards(path: str | Path, decode: bool = True) -> InspectReport:
    """Inspect a shard folder, manifest.json, .tar file or brace pattern (decode=False: keys only)."""
    problems: list[str] = []
    manifest_path = find_manifest(path)
    manifest: Manifest | None = None
    if manifest_path is not None:
        try:
            manifest = Manifest.load(manifest_path)
        except Nova3DError as err:
            problems.append(str(err))
    try:
        shards = resolve_shards(path)
    except IncompleteShardsError as err:  # a problem to report; still inspect what is there
        problems.append(str(err))
        shards = err.shards
    if not shards:
        problems.append(f"{path}: no shards found")
    listed: dict[str, ShardInfo] = {s.name: s for s in manifest.shards} if manifest else {}
    reports = []
    for shard in shards:
        if not Path(shard).is_file():
            problems.append(f"{shard}: missing")
            continue
        report = _inspect_tar(shard, decode, problems)
        info = listed.get(Path(shard).name)
        if manifest is not None:
            if info is None:
                report.checksum = "not in manifest"
                problems.append(f"{shard}: not listed in {manifest_path}")
            elif file_sha256(shard) != info.sha256:
                report.checksum = "MISMATCH"
                problems.append(f"{shard}: sha256 differs from {manifest_path} (modified or truncated)")
            else:
                report.checksum = "ok"
            if info is not None and info.num_samples != report.num_samples:
                problems.append(f"{shard}: {report.num_samples} good samples, manifest lists {info.num_samples}")
        reports.append(report)
    if manifest is not None and manifest_path is not None and Path(str(path)).is_dir():
        for name in listed:
            if not (manifest_path.parent / name).is_file():
                problems.append(f"{manifest_path.parent / name}: listed in {manifest_path} but missing")
    return InspectReport(reports, problems, str(manifest_path) if manifest_path else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nova3d inspect-shards", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a shard folder, manifest.json, a .tar file or a brace pattern")
    parser.add_argument("--no-decode", action="store_true", help="list keys only; do not decode images")
    args = parser.parse_args(argv)
    report = inspect_shards(args.path, decode=not args.no_decode)
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
