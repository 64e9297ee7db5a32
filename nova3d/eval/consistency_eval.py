"""`nova3d eval --consistency`: the consistency score (nova3d.eval.consistency) over a set, as a
column of the evaluation's results (nova3d.eval.results).

Two uses:
  * with ground truth (--pred --gt): each evaluated object also gets the score of its views
    VIEWS/<object_id>/ (`add_consistency`);
  * without (--views only): every object folder under VIEWS (or VIEWS itself) is scored, and the
    summary holds that score alone (`consistency_only`).
A folder that cannot be scored is listed with the reason (the file and the problem), never
crashes the set; the result files are written as every evaluation writes them (staged).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from nova3d.atomic import MARKER, check_replaceable
from nova3d.errors import Nova3DError
from nova3d.eval.consistency import ConsistencySettings, object_consistency, object_folders, settings_json
from nova3d.eval.results import BROKEN, OK, EvalSummary, ObjectResult

NO_GT_REASON = "not scored: a consistency-only evaluation has no ground truth"


def _score(folder: Path, settings: ConsistencySettings):
    """(ConsistencyResult, None) or (None, reason) for one object folder."""
    try:
        return object_consistency(folder, settings), None
    except (Nova3DError, ValueError) as err:  # bad input names its file; a fit that fails says why
        return None, str(err).splitlines()[0] if str(folder) in str(err) else f"{folder}: {err}"


def add_consistency(summary: EvalSummary, views_dir: str | Path, settings: ConsistencySettings = ConsistencySettings(),
                    progress: bool = True) -> EvalSummary:
    """Score VIEWS/<object_id>/ for every evaluated object of `summary` (in place; returned)."""
    views_dir = Path(views_dir)
    if not views_dir.is_dir():
        raise Nova3DError(f"--views {views_dir}: folder not found")
    summary.consistency = settings_json(settings)
    summary.views_dir = str(views_dir)
    for result in tqdm(summary.evaluated, desc="consistency", unit="obj", disable=not progress):
        folder = views_dir / result.object_id
        if not folder.is_dir():
            result.consistency_reason = f"no views: {folder} not found"
            continue
        result.consistency, result.consistency_reason = _score(folder, settings)
    return summary


def consistency_only(views_dir: str | Path, out_dir: str | Path | None = None,
                     settings: ConsistencySettings = ConsistencySettings(), progress: bool = True) -> EvalSummary:
    """Score every object folder of `views_dir` (or the folder itself) without ground truth;
    writes per_object.csv, summary.json and summary.md into out_dir when given."""
    from nova3d.eval.protocol import versions

    start = time.perf_counter()
    folders = object_folders(views_dir)  # Nova3DError naming what is missing
    if out_dir is not None:
        check_replaceable(out_dir)  # before the fits, not after
    objects = []
    for folder in tqdm(folders, desc="consistency", unit="obj", disable=not progress):
        t0 = time.perf_counter()
        scored, reason = _score(folder, settings)
        status = OK if scored is not None else BROKEN
        objects.append(ObjectResult(folder.name, status, reason=reason, consistency=scored,
                                    seconds=time.perf_counter() - t0))
    summary = EvalSummary(protocol={"name": "consistency"}, protocol_overrides={}, objects=objects,
                          lpips_reason=NO_GT_REASON, versions=versions(),
                          environment={"device": _device(settings), "torch_threads": torch.get_num_threads()},
                          pred_dir=None, gt_dir=None, views_dir=str(views_dir), seconds=time.perf_counter() - start,
                          consistency=settings_json(settings))
    write_if_useful(summary, out_dir)
    return summary


def _device(settings: ConsistencySettings) -> str:
    """The device the fits asked for (the last device= override; fusion's default is auto)."""
    return next((o.split("=", 1)[1] for o in reversed(settings.overrides) if o.startswith("device=")), "auto")


def write_if_useful(summary: EvalSummary, out_dir: str | Path | None) -> None:
    """Write the result files unless nothing was evaluated and an earlier result is there (it is
    kept as it was: the rule of nova3d.eval.protocol.evaluate_set)."""
    if out_dir is not None and (summary.evaluated or not (Path(out_dir) / MARKER).exists()):
        summary.write(out_dir)
