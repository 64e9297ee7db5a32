"""Merge the per-task shard manifests of a SLURM array render into one manifest.json.

    python -m data_prep.merge_manifests OUT/shards [--allow-missing]

Reads OUT/shards/task-IIII-of-NNNN/manifest.json (data_prep.array_task) and writes
OUT/shards/manifest.json listing every task's shards by relative path
("task-0000-of-0002/train-000000.tar"), so `data.train_shards=OUT/shards` trains on all of them
(nova3d.data.manifest.resolve_shards follows the manifest's names). Checks, each a one-line error:
all tasks of one array size are present (unless --allow-missing), every task used the same
shard encoding, and no object was packed twice. Plain JSON: no torch import, so it is quick as
its own small SLURM job (`sbatch --dependency=afterok:<array job> render.sbatch --merge OUT`).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from nova3d.atomic import write_json_atomic
from nova3d.data import schema
from nova3d.errors import Nova3DError

TASK_DIR = re.compile(r"task-(\d+)-of-(\d+)")


def task_manifests(shards_dir: Path, allow_missing: bool = False) -> list[Path]:
    """The task manifests in task order; Nova3DError for mixed array sizes or missing tasks."""
    tasks = sorted((int(m[2]), int(m[1]), p) for p in shards_dir.iterdir()
                   if p.is_dir() and (m := TASK_DIR.fullmatch(p.name)))
    if not tasks:
        raise Nova3DError(f"{shards_dir}: no task-*-of-* folders (data_prep.array_task writes them)")
    sizes = sorted({n for n, _, _ in tasks})
    if len(sizes) > 1:
        raise Nova3DError(f"{shards_dir}: task folders of array sizes {sizes}; keep one size, remove the others")
    count = sizes[0]
    found = {i: p / schema.MANIFEST_FILE for _, i, p in tasks if (p / schema.MANIFEST_FILE).is_file()}
    missing = [i for i in range(count) if i not in found]
    if missing and not allow_missing:
        raise Nova3DError(f"{shards_dir}: {len(missing)} of {count} tasks have no manifest (unfinished or "
                          f"failed?), e.g. task {missing[0]}; rerun them or pass --allow-missing")
    return [found[i] for i in sorted(found)]


def merge(shards_dir: str | Path, allow_missing: bool = False) -> Path:
    """Write shards_dir/manifest.json from the task manifests; returns its path."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise Nova3DError(f"{shards_dir}: not a folder")
    shards, rejected, splits, encoding, first_of = [], [], {}, None, {}
    for path in task_manifests(shards_dir, allow_missing):
        try:
            data = json.loads(path.read_text())
            if data.get("format") != schema.SHARD_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}")
            task_shards, task_rejected, task_encoding = data["shards"], data["rejected"], data["encoding"]
        except (OSError, ValueError, KeyError) as err:
            raise Nova3DError(f"{path}: not a valid shard manifest ({err})") from err
        if encoding is None:
            encoding = task_encoding
        elif task_encoding != encoding:
            raise Nova3DError(f"{path}: shard encoding {task_encoding} differs from the other tasks' {encoding}")
        task = path.parent.name
        for shard in task_shards:
            for obj in shard["objects"]:
                if obj in first_of:
                    raise Nova3DError(f"{path}: object {obj!r} is also in {first_of[obj]}; each object once")
                first_of[obj] = f"{task}/{shard['name']}"
            shards.append({**shard, "name": f"{task}/{shard['name']}"})
            split = splits.setdefault(shard["split"], {"pattern": None, "num_shards": 0, "num_samples": 0})
            split["num_shards"] += 1
            split["num_samples"] += shard["num_samples"]
        rejected += [{**r, "task": task} for r in task_rejected]
    # "pattern" stays null: the shards live in several folders; the manifest's names are the list.
    manifest = {"encoding": encoding, "shards": shards, "splits": splits, "rejected": rejected,
                "render_dir": str(shards_dir.parent / "renders"), "format": schema.SHARD_FORMAT,
                "format_version": schema.SHARD_FORMAT_VERSION}
    out = shards_dir / schema.MANIFEST_FILE
    write_json_atomic(out, manifest)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.merge_manifests", description=__doc__.split("\n")[0])
    parser.add_argument("shards_dir", help="OUT/shards of data_prep.array_task")
    parser.add_argument("--allow-missing", action="store_true", help="merge the tasks that finished")
    args = parser.parse_args(argv)
    try:
        out = merge(args.shards_dir, args.allow_missing)
    except Nova3DError as err:
        print(f"merge_manifests: error: {err}", file=sys.stderr)
        return 2
    data = json.loads(out.read_text())
    counts = ", ".join(f"{k}: {v['num_samples']} objects in {v['num_shards']} shards" for k, v in data["splits"].items())
    print(f"wrote {out} ({counts}; {len(data['rejected'])} rejected)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
