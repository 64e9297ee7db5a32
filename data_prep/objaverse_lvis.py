"""Objaverse-LVIS object lists: list uids, fetch GLBs, filter meshes, split for array jobs.

The object list is JSON Lines, one object per line::

    {"uid": "8f3a...", "category": "chair", "path": "/root/.objaverse/.../8f3a....glb",
     "status": "ok", "vertices": 5120, "extents": [0.9, 1.2, 0.8]}
    {"uid": "c01d...", "category": "rug", "path": "...", "status": "rejected",
     "reason": "degenerate_bbox", "detail": "extents [1.0, 0.0, 2.0]"}

Only `uid` is required. `path` is filled by `download`; `status`/`reason`/`detail`/
`vertices`/`extents` by `filter_objects`. Unknown keys are kept through a read/write round trip.
`reason` is one of the `REASONS` codes (stable, so runs can be counted by reason);
`detail` is free text for a human.

Typical use (only `list` and `download` need a connected machine)::

    python -m data_prep.objaverse_lvis list -o objects.jsonl --max-per-category 50
    python -m data_prep.objaverse_lvis download objects.jsonl --processes 16
    python -m data_prep.objaverse_lvis filter objects.jsonl
    python -m data_prep.objaverse_lvis paths objects.jsonl   # in a SLURM array task: its slice
    python -m data_prep.objaverse_lvis filter objects.jsonl --failed-renders failures.jsonl
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

OK, REJECTED = "ok", "rejected"
REASONS = (
    "no_path",  # never downloaded (objaverse did not know the uid, or download not run)
    "missing_file",  # path recorded but the file is gone
    "unreadable",  # trimesh could not parse it (garbage, truncated, unsupported)
    "empty_mesh",  # parsed, but no triangles (point clouds, empty scenes)
    "too_few_vertices",
    "too_many_vertices",
    "degenerate_bbox",  # an extent is ~0 (a plane, a line, a point) or not finite
    "thin_bbox",  # a very flat or needle-like box: min/max extent below the ratio
    "failed_render",  # listed in the renderer's failures file
)

# Defaults, chosen for 16 views on an elevation-0 orbit (DESIGN.md §4): below ~100 vertices
# an Objaverse object is usually a primitive placeholder; above ~1M Blender import and
# Cycles BVH build dominate render time; a box thinner than 1% of its length is a line
# from most orbit views.
DEFAULT_MIN_VERTICES = 100
DEFAULT_MAX_VERTICES = 1_000_000
DEFAULT_MIN_EXTENT_RATIO = 0.01
_ZERO_EXTENT = 1e-6  # relative to the largest extent: below this an axis has collapsed

_FIELDS = ("uid", "category", "path", "status", "reason", "detail", "vertices", "extents")
T = TypeVar("T")


class ObjectListError(ValueError):
    """Bad object-list or failures file; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class ObjectRecord:
    uid: str
    category: str | None = None
    path: str | None = None
    status: str | None = None  # None before filtering, then OK or REJECTED
    reason: str | None = None  # one of REASONS when rejected
    detail: str | None = None
    vertices: int | None = None
    extents: tuple[float, float, float] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def accepted(self) -> bool:
        """Renderable: has a path and was not rejected (unfiltered lists count as accepted)."""
        return self.path is not None and self.status != REJECTED

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _FIELDS if getattr(self, k) is not None}
        if self.extents is not None:
            out["extents"] = [round(float(e), 6) for e in self.extents]
        return {**out, **self.extra}


def _reject(rec: ObjectRecord, reason: str, detail: str) -> ObjectRecord:
    return dataclasses.replace(rec, status=REJECTED, reason=reason, detail=detail)


def _record_from_json(obj: Any, where: str) -> ObjectRecord:
    if not isinstance(obj, dict):
        raise ObjectListError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("uid"), str) or not obj["uid"]:
        raise ObjectListError(f"{where}: missing or non-string 'uid'")
    known = {k: obj[k] for k in _FIELDS if obj.get(k) is not None}
    for key in known.keys() - {"vertices", "extents"}:
        if not isinstance(known[key], str):
            raise ObjectListError(f"{where}: {key!r} must be a string, got {known[key]!r}")
    if not isinstance(known.get("vertices", 0), int):
        raise ObjectListError(f"{where}: 'vertices' must be an integer")
    if "extents" in known:
        ext = known["extents"]
        if not (isinstance(ext, list) and len(ext) == 3 and all(isinstance(e, (int, float)) for e in ext)):
            raise ObjectListError(f"{where}: 'extents' must be a list of 3 numbers")
        known["extents"] = tuple(float(e) for e in ext)
    if known.get("status") not in (None, OK, REJECTED):
        raise ObjectListError(f"{where}: unknown status {known['status']!r}")
    extra = {k: v for k, v in obj.items() if k not in _FIELDS}
    return ObjectRecord(**known, extra=extra)


def _read_jsonl(path: str | os.PathLike) -> Iterable[tuple[str, Any]]:
    """Yield (``file:line`` location, parsed value) for each non-blank line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ObjectListError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ObjectListError(f"{path}: cannot read ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise ObjectListError(f"{where}: malformed JSON ({e.msg})") from None


def read_object_list(path: str | os.PathLike) -> list[ObjectRecord]:
    """Read an object list; raises ObjectListError naming the file and line on bad input."""
    records: list[ObjectRecord] = []
    seen: dict[str, str] = {}  # uid -> where it first appeared
    for where, obj in _read_jsonl(path):
        rec = _record_from_json(obj, where)
        if rec.uid in seen:
            raise ObjectListError(f"{where}: duplicate uid {rec.uid!r} (first at {seen[rec.uid]})")
        seen[rec.uid] = where
        records.append(rec)
    return records


def write_object_list(path: str | os.PathLike, records: Iterable[ObjectRecord]) -> None:
    """Write atomically: readers (and a requeued job) never see a half-written list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_slice(records: Sequence[T], task_id: int, num_tasks: int) -> list[T]:
    """This task's share: every `num_tasks`-th record starting at `task_id`.

    Strided rather than contiguous so each task gets a mix of categories (render cost
    varies by category); slices are disjoint, cover the list, and differ in size by <= 1.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id must be in [0, {num_tasks}), got {task_id}")
    return list(records[task_id::num_tasks])


def list_lvis(
    categories: Iterable[str] | None = None,
    max_per_category: int | None = None,
    seed: int = 0,
) -> list[ObjectRecord]:
    """Objaverse-LVIS objects as records (uid, category), sorted by category then uid.

    Sampling uses one RNG per category seeded by (seed, category), so the sample of a
    category does not change when other categories are added or removed.
    """
    import objaverse  # imported here so the offline steps never need it

    annotations: dict[str, list[str]] = objaverse.load_lvis_annotations()
    if categories is None:
        chosen = sorted(annotations)
    else:
        chosen = sorted(set(categories))
        for cat in chosen:
            if cat not in annotations:
                near = difflib.get_close_matches(cat, annotations, n=3)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise ValueError(f"unknown LVIS category {cat!r}{hint}")
    if max_per_category is not None and max_per_category < 1:
        raise ValueError(f"max_per_category must be >= 1, got {max_per_category}")

    # A uid listed under several categories belongs to the alphabetically first one of the
    # whole annotation set, so ownership (and each sample) is independent of `categories`.
    owner: dict[str, str] = {}
    for cat in sorted(annotations):
        for uid in annotations[cat]:
            owner.setdefault(uid, cat)
    records: list[ObjectRecord] = []
    for cat in chosen:
        uids = sorted({u for u in annotations[cat] if owner[u] == cat})
        if max_per_category is not None and len(uids) > max_per_category:
            uids = sorted(random.Random(f"{seed}:{cat}").sample(uids, max_per_category))
        records.extend(ObjectRecord(uid=u, category=cat) for u in uids)
    return records


def download(records: Sequence[ObjectRecord], processes: int = 1) -> list[ObjectRecord]:
    """Fetch GLBs with `objaverse.load_objects` (skips files already cached) and fill `path`.

    Uids objaverse does not return keep `path=None`; `filter_objects` rejects them as no_path.
    """
    import objaverse

    paths = objaverse.load_objects([r.uid for r in records], download_processes=processes)
    return [dataclasses.replace(r, path=paths.get(r.uid, r.path)) for r in records]


def read_failed_renders(path: str | os.PathLike) -> dict[str, str]:
    """Renderer failures file (JSON Lines with `uid` or `object`, and `reason`) -> {key: reason}."""
    failed = {}
    for where, obj in _read_jsonl(path):
        key = obj.get("uid", obj.get("object")) if isinstance(obj, dict) else None
        if not isinstance(key, str) or not key:
            raise ObjectListError(f"{where}: expected an object with a 'uid' or 'object' string")
        failed[key] = str(obj.get("reason", "render failed"))
    return failed


def _failure_index(failed: set[str] | dict[str, str]) -> dict[str, str]:
    # The renderer may name an object by uid, by mesh path (relative or absolute), or by a
    # path whose stem is the uid (Objaverse GLBs are `<uid>.glb`): index all three.
    items = failed.items() if isinstance(failed, dict) else ((k, "render failed") for k in failed)
    index = {}
    for key, reason in items:
        for k in (key, os.path.abspath(key), Path(key).stem):
            index.setdefault(k, reason)
    return index


def _check_mesh(
    rec: ObjectRecord, min_vertices: int, max_vertices: int, min_extent_ratio: float
) -> ObjectRecord:
    import numpy as np
    import trimesh

    if rec.path is None:
        return _reject(rec, "no_path", "no local mesh path (not downloaded?)")
    if not os.path.isfile(rec.path):
        return _reject(rec, "missing_file", f"{rec.path} does not exist")
    try:
        # load_mesh concatenates a scene's meshes with their node transforms applied;
        # materials and vertex merging are skipped: only counts and bounds matter here, so the
        # file's own axes are kept (extents are per stored axis; nova3d.mesh_io is not needed).
        mesh = trimesh.load_mesh(rec.path, process=False, skip_materials=True)
    except Exception as e:  # trimesh raises many types on bad input
        return _reject(rec, "unreadable", f"{type(e).__name__}: {e}"[:200])
    n = len(mesh.vertices)
    if n == 0 or len(mesh.faces) == 0:
        return _reject(rec, "empty_mesh", f"{n} vertices, {len(mesh.faces)} faces")
    rec = dataclasses.replace(rec, vertices=n)
    if n < min_vertices:
        return _reject(rec, "too_few_vertices", f"{n} < {min_vertices}")
    if n > max_vertices:
        return _reject(rec, "too_many_vertices", f"{n} > {max_vertices}")
    extents = np.ptp(np.asarray(mesh.vertices, dtype=np.float64), axis=0)
    shown = f"extents {[round(float(e), 6) for e in extents]}"
    if not np.all(np.isfinite(extents)):  # NaN/inf vertices; not stored: JSON has no NaN
        return _reject(rec, "degenerate_bbox", shown)
    rec = dataclasses.replace(rec, extents=tuple(float(e) for e in extents))
    if extents.min() <= _ZERO_EXTENT * max(extents.max(), 1e-12):
        return _reject(rec, "degenerate_bbox", shown)
    ratio = extents.min() / extents.max()
    if ratio < min_extent_ratio:
        return _reject(rec, "thin_bbox", f"{shown}, min/max {ratio:.4g} < {min_extent_ratio}")
    return dataclasses.replace(rec, status=OK, reason=None, detail=None)


def filter_objects(
    records: Sequence[ObjectRecord],
    min_vertices: int = DEFAULT_MIN_VERTICES,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    min_extent_ratio: float = DEFAULT_MIN_EXTENT_RATIO,
    failed_renders: set[str] | dict[str, str] | str | os.PathLike | None = None,
    recheck: bool = False,
    progress: bool = True,
) -> list[ObjectRecord]:
    """Mark every record `ok` or `rejected` (with a reason); order and length are kept.

    Rejections are sticky and records already `ok` skip the mesh checks, so re-running with
    a new failures file after rendering is cheap. `recheck=True` re-evaluates everything
    (use it after changing thresholds).
    """
    from tqdm import tqdm

    if isinstance(failed_renders, (str, os.PathLike)):
        failed_renders = read_failed_renders(failed_renders)
    failed = _failure_index(failed_renders or set())
    out = []
    for rec in tqdm(records, desc="filter", unit="obj", disable=not progress):
        if recheck:
            rec = dataclasses.replace(rec, status=None, reason=None, detail=None)
        if rec.status == REJECTED:
            out.append(rec)
            continue
        keys = [rec.uid] + ([rec.path, os.path.abspath(rec.path)] if rec.path else [])
        hit = next((failed[k] for k in keys if k in failed), None)
        if hit is not None:
            out.append(_reject(rec, "failed_render", hit))
        elif rec.status == OK:
            out.append(rec)
        else:
            out.append(_check_mesh(rec, min_vertices, max_vertices, min_extent_ratio))
    return out


def summarize(records: Iterable[ObjectRecord]) -> Counter[str]:
    """Counts by outcome: 'ok', 'unfiltered', or the rejection reason."""
    return Counter(
        (r.reason or REJECTED) if r.status == REJECTED else (r.status or "unfiltered") for r in records
    )


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """The command line, `python -m data_prep.objaverse_lvis ...` (data_prep/objaverse_cli.py)."""
    from data_prep.objaverse_cli import main as cli_main  # imported here: the CLI imports this module

    cli_main(argv)


if __name__ == "__main__":
    main()
