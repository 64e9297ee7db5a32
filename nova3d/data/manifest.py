"""A shard folder's manifest.json, and turning a shard spec (folder, pattern, list) into paths."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from nova3d.atomic import write_json_atomic
from nova3d.data import schema
from nova3d.errors import Nova3DError


@dataclass
class ShardInfo:
    """One shard as recorded in manifest.json."""

    name: str  # file name, relative to the manifest's folder
    split: str
    num_samples: int
    num_bytes: int
    sha256: str
    objects: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    """manifest.json of a shard folder (written last, atomically, by write_shards)."""

    encoding: dict
    shards: list[ShardInfo]
    splits: dict  # split -> {"pattern": brace pattern, "num_shards": n, "num_samples": n}
    rejected: list[dict] = field(default_factory=list)  # {"object_id", "path", "reason", "detail"}
    render_dir: str = ""
    format: str = schema.SHARD_FORMAT
    format_version: int = schema.SHARD_FORMAT_VERSION

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / schema.MANIFEST_FILE
        write_json_atomic(path, dataclasses.asdict(self))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if path.is_dir():
            path = path / schema.MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("format") != schema.SHARD_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {schema.SHARD_FORMAT!r}")
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise Nova3DError(f"{path}: not a valid shard manifest ({err})") from err

    def shard_names(self, split: str | None = None) -> list[str]:
        return [s.name for s in self.shards if split is None or s.split == split]


class IncompleteShardsError(Nova3DError):
    """A folder holding shards but no manifest.json: write_shards did not finish there."""

    def __init__(self, folder: Path, shards: list[str]):
        super().__init__(f"{folder}: incomplete shard set (shards but no {schema.MANIFEST_FILE}: write_shards was "
                         f"interrupted?); rerun write_shards, or name the .tar files to read them anyway")
        self.shards = shards  # what is there, for a reader that reports rather than refuses


def find_manifest(spec: str | os.PathLike) -> Path | None:
    """The manifest.json of a shard spec: a folder's own, or the one beside a .tar or brace pattern."""
    path = Path(str(spec))
    if path.name != schema.MANIFEST_FILE:  # a folder's own only: its parent's lists other shards
        path = (path if path.is_dir() else path.parent) / schema.MANIFEST_FILE
    return path if path.is_file() else None


def resolve_shards(spec: str | os.PathLike | list, split: str | None = None) -> list[str]:
    """Shard paths named by `spec`, in order.

    `spec`: a brace pattern or .tar path; a folder (its manifest's `split` shards when it has a
    manifest and `split` is given, else every *.tar in it); a manifest.json; a text file listing
    one shard per line (relative to the file); or a list of any of these. A folder with shards
    but no manifest raises IncompleteShardsError: write_shards writes the manifest last, so its
    shards may be a fraction of the objects.
    """
    if isinstance(spec, (list, tuple)):
        return [p for item in spec for p in resolve_shards(item, split)]
    text = str(spec)
    path = Path(text)
    if path.is_dir() or path.name == schema.MANIFEST_FILE:
        manifest_path = find_manifest(path)
        if manifest_path is not None and (split is not None or path.name == schema.MANIFEST_FILE):
            names = Manifest.load(manifest_path).shard_names(split)
            return [str(manifest_path.parent / n) for n in names]
        if path.is_dir():
            shards = sorted(glob.glob(str(path / f"*{schema.SHARD_EXT}")))
            if shards and manifest_path is None:
                raise IncompleteShardsError(path, shards)
            return shards
    if path.is_file() and not text.endswith(schema.SHARD_EXT):
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return [str(path.parent / ln) for ln in lines]
    return list(braceexpand.braceexpand(text))


def _other_splits(spec, split: str | None) -> str:
    """What a manifest holds when none of its shards is of the asked split (else "")."""
    path = Path(str(spec)) if isinstance(spec, (str, os.PathLike)) else None
    read_by_split = split is not None and path is not None and (path.is_dir() or path.name == schema.MANIFEST_FILE)
    manifest = find_manifest(path) if read_by_split else None
    held = sorted({s.split for s in Manifest.load(manifest).shards}) if manifest is not None else []
    return (f" of split {split!r} (its {schema.MANIFEST_FILE} lists split {', '.join(map(repr, held))}; "
            "name the .tar files to read them anyway)") if held else ""


def existing_shards(spec: str | os.PathLike | list, split: str | None = None) -> list[str]:
    """resolve_shards, checked: Nova3DError when nothing matches or a named shard is missing."""
    shards = resolve_shards(spec, split)
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards:
        raise Nova3DError(f"{spec}: no shards found{_other_splits(spec, split)}")
    if missing:
        raise Nova3DError(f"{spec}: {len(missing)} of {len(shards)} shards missing, e.g. {missing[0]}")
    return shards
