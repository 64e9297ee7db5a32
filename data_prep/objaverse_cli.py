"""The command line of data_prep/objaverse_lvis.py (its module docstring has the file format
and the steps)::

    python -m data_prep.objaverse_lvis {list,download,filter,paths} ...

Errors a user can cause (a missing or malformed object list, an unwritable output) exit with
one line, "error: ...".
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from data_prep import objaverse_lvis as ol


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.objaverse_lvis",
        description="Build an Objaverse-LVIS object list (JSON Lines) for the Blender renderer.",
        epilog=(
            "Object list: one JSON object per line with 'uid' and optionally 'category', 'path'"
            " (local mesh), 'status' (ok|rejected), 'reason' (" + ", ".join(ol.REASONS) + "), 'detail'."
            " Steps: list -> download (connected machine) -> filter -> render each `paths` slice"
            " -> filter --failed-renders."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="list LVIS uids/categories (downloads the annotations)")
    s.add_argument("-o", "--out", required=True, help="object list to write (.jsonl)")
    s.add_argument("--categories", nargs="+", help="LVIS categories to keep (default: all)")
    s.add_argument("--max-per-category", type=int, help="sample at most N uids per category")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    s = sub.add_parser("download", help="fetch GLBs with objaverse and fill in local paths")
    s.add_argument("objects", help="object list to read")
    s.add_argument("-o", "--out", help="object list to write (default: rewrite the input)")
    s.add_argument(
        "--processes", type=int, default=_env_int("SLURM_CPUS_PER_TASK", 8),
        help="parallel downloads (default: $SLURM_CPUS_PER_TASK or 8)",
    )

    s = sub.add_parser("filter", help="reject bad meshes and failed renders, keeping reasons")
    s.add_argument("objects", help="object list to read")
    s.add_argument("-o", "--out", help="object list to write (default: rewrite the input)")
    s.add_argument("--min-vertices", type=int, default=ol.DEFAULT_MIN_VERTICES, help="default: %(default)s")
    s.add_argument("--max-vertices", type=int, default=ol.DEFAULT_MAX_VERTICES, help="default: %(default)s")
    s.add_argument(
        "--min-extent-ratio", type=float, default=ol.DEFAULT_MIN_EXTENT_RATIO,
        help="reject boxes whose smallest/largest extent is below this (default: %(default)s)",
    )
    s.add_argument("--failed-renders", help="renderer failures file (JSON Lines with uid/object)")
    s.add_argument("--recheck", action="store_true", help="re-evaluate records already filtered")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("paths", help="print the accepted mesh paths of one array-job slice")
    s.add_argument("objects", help="object list to read")
    s.add_argument(
        "--task-id", type=int,
        default=_env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0),
        help="0-based slice index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, or 0)",
    )
    s.add_argument(
        "--num-tasks", type=int, default=_env_int("SLURM_ARRAY_TASK_COUNT", 1),
        help="number of slices (default: $SLURM_ARRAY_TASK_COUNT or 1)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run one subcommand; SystemExit("error: ...") for a bad object list or output path."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            records = ol.list_lvis(args.categories, args.max_per_category, args.seed)
            ol.write_object_list(args.out, records)
            print(f"wrote {len(records)} objects to {args.out}", file=sys.stderr)
        elif args.command == "download":
            records = ol.download(ol.read_object_list(args.objects), args.processes)
            ol.write_object_list(args.out or args.objects, records)
            got = sum(r.path is not None for r in records)
            print(f"{got}/{len(records)} objects have a local path", file=sys.stderr)
        elif args.command == "filter":
            records = ol.filter_objects(
                ol.read_object_list(args.objects), args.min_vertices, args.max_vertices,
                args.min_extent_ratio, failed_renders=args.failed_renders,
                recheck=args.recheck, progress=not args.no_progress,
            )
            ol.write_object_list(args.out or args.objects, records)
            counts = ", ".join(f"{k}={v}" for k, v in sorted(ol.summarize(records).items()))
            print(f"{len(records)} objects: {counts}", file=sys.stderr)
        elif args.command == "paths":
            accepted = [r for r in ol.read_object_list(args.objects) if r.accepted]
            for rec in ol.shard_slice(accepted, args.task_id, args.num_tasks):
                print(rec.path)
    except (ValueError, OSError) as e:  # ObjectListError is a ValueError
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
