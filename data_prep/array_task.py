"""One task of a SLURM array that renders objects into shards: its slice, its own shards.

    python -m data_prep.array_task --out OUT (--objects LIST.jsonl | --procedural [NAME ...]) [render flags]
        [--task-id I --num-tasks N] [--max-count K] [--val-fraction F]

experiments/slurm/render.sbatch runs it once per array task (the task id and count come from
SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT). Task i of n takes every
n-th object starting at i (data_prep.objaverse_lvis.shard_slice: disjoint, covering, mixed
categories) and writes

    OUT/renders/task-000i-of-000n/<object>/    data_prep.render_views (failures.jsonl lists failures)
    OUT/shards/task-000i-of-000n/              data_prep.write_shards: train-*.tar (+ val-*.tar), manifest.json

Rerunning skips what is done: rendered objects are kept, and the shards are only rewritten when
the task's render folder holds objects its manifest does not list. `python -m
data_prep.merge_manifests OUT/shards` then writes the one manifest for all tasks.
An object that fails to render is listed (failures.jsonl), not fatal: the exit status is 0 when
the task's shards are written, 2 for unusable input (as render_views).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from data_prep.objaverse_lvis import read_object_list, shard_slice
from data_prep.render_io import ObjectSource, RenderSettings, build_parser, collect_sources
from nova3d.data import schema
from nova3d.errors import Nova3DError

RENDERS_DIR, SHARDS_DIR = "renders", "shards"


def task_dir_name(task_id: int, num_tasks: int) -> str:
    """`task-0003-of-0100`: the array size is in the name, so slices of two sizes never mix."""
    return f"task-{task_id:04d}-of-{num_tasks:04d}"


def array_position(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(task id, task count) of this SLURM array task; (0, 1) outside an array."""
    def get(name: str, default: int) -> int:
        value = env.get(name, "")
        return int(value) if value.isdigit() else default

    return get("SLURM_ARRAY_TASK_ID", 0) - get("SLURM_ARRAY_TASK_MIN", 0), get("SLURM_ARRAY_TASK_COUNT", 1)


def all_sources(objects: Optional[str], procedural: Optional[list[str]]) -> list[ObjectSource]:
    """Every object of the run in a fixed order (each task slices the same list).

    An object list gives its accepted records (ids = uids; a missing file becomes a render failure
    of that object, not an error of the task); `procedural` names built-in objects (empty: all)."""
    if objects is not None:
        try:
            records = [r for r in read_object_list(objects) if r.accepted]
        except (OSError, ValueError) as err:
            raise Nova3DError(f"{objects}: {err}") from err
        return [ObjectSource(schema.safe_object_id(r.uid), str(r.path), path=Path(r.path)) for r in records]
    from data_prep.procedural import PROCEDURAL_OBJECTS

    return collect_sources([], procedural or list(PROCEDURAL_OBJECTS))


def shards_done(render_dir: Path, shard_dir: Path) -> bool:
    """The task's manifest lists (packed or rejected) every object folder now in its render folder."""
    manifest = shard_dir / schema.MANIFEST_FILE
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text())
    listed = {o for s in data["shards"] for o in s["objects"]} | {r["object_id"] for r in data["rejected"]}
    from data_prep.write_shards import find_object_folders

    return {f.name for f in find_object_folders(render_dir)} <= listed


def run_task(out: Path, sources: Sequence[ObjectSource], settings: RenderSettings, task_id: int, num_tasks: int,
             max_count: int = 1000, val_fraction: float = 0.0, progress: bool = True) -> dict:
    """Render this task's slice and pack it; returns a summary dict (also printed as JSON)."""
    from data_prep.render_views import render_objects
    from data_prep.write_shards import find_object_folders, write_shards

    if not 0 <= task_id < num_tasks:
        raise Nova3DError(f"task {task_id} is not in 0..{num_tasks - 1}")
    mine = shard_slice(list(sources), task_id, num_tasks)
    name = task_dir_name(task_id, num_tasks)
    render_dir, shard_dir = out / RENDERS_DIR / name, out / SHARDS_DIR / name
    rendered = render_objects(mine, render_dir, settings, progress=progress)
    summary = {"task": task_id, "tasks": num_tasks, "objects": len(mine), "rendered": len(rendered.rendered),
               "skipped": len(rendered.skipped), "failed": len(rendered.failed), "shards": "kept"}
    if not find_object_folders(render_dir):
        summary["shards"] = "none (no object rendered)"
    elif not shards_done(render_dir, shard_dir):
        shutil.rmtree(shard_dir, ignore_errors=True)  # a partial or outdated pack of this task only
        packed = write_shards(render_dir, shard_dir, max_count=max_count, val_fraction=val_fraction,
                              progress=progress)
        summary["shards"] = f"{len(packed.shards)} written ({packed.num_samples} objects)"
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser("python -m data_prep.array_task", __doc__.split("\n")[0])
    parser.add_argument("--objects", help="object list (.jsonl, data_prep.objaverse_lvis): its accepted records")
    parser.add_argument("--task-id", type=int, help="default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN")
    parser.add_argument("--num-tasks", type=int, help="default: $SLURM_ARRAY_TASK_COUNT")
    parser.add_argument("--max-count", type=int, default=1000, help="objects per shard at most")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of objects for val-*.tar")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    task_id, num_tasks = array_position()
    task_id = task_id if args.task_id is None else args.task_id
    num_tasks = num_tasks if args.num_tasks is None else args.num_tasks
    try:
        if args.inputs or (args.objects is None) == (args.procedural is None):
            raise Nova3DError("give exactly one of --objects LIST.jsonl or --procedural [NAME ...]")
        settings = RenderSettings(
            views=args.views, resolution=args.resolution, elevation=tuple(args.elevation), samples=args.samples,
            denoise=args.denoise, fov=args.fov, radius=args.radius, random_azimuth=args.random_azimuth,
            seed=args.seed, background=args.background, depth=args.depth, device=args.device, limit=args.limit)
        summary = run_task(Path(args.out), all_sources(args.objects, args.procedural), settings, task_id,
                           num_tasks, args.max_count, args.val_fraction, progress=not args.no_progress)
    except Nova3DError as err:
        print(f"array_task: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
