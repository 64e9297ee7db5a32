"""Results of an evaluation: one ObjectResult per object, the set's EvalSummary, and its files.

`EvalSummary.write(out_dir)` writes (staged and swapped in whole: a failed run keeps the old ones):
  per_object.csv   one row per ground-truth object, evaluated or not (status + reason)
  summary.json     protocol, means/medians over evaluated objects, counts, what was not evaluated
                   and why, unmatched predictions, LPIPS status, software versions, every object's
                   full record (alignment transforms, per-view PSNR/SSIM)
  summary.md       the same as a markdown table
With `nova3d eval --consistency`, every object also gets the ground-truth-free consistency score of
its views (nova3d.eval.consistency: consistency_psnr / _ssim / _normal_deg); with no --gt at all,
only that score (`gt_dir` None, a consistency-only table).
Per-view PSNR is capped by the protocol (psnr_max_db, 100 dB), so means stay finite; were an inf to
reach a file anyway, JSON has no inf: it is written as the string "inf".
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nova3d.atomic import staged_dir, write_json_atomic
from nova3d.eval.appearance import AppearanceResult
from nova3d.eval.consistency import ConsistencyResult
from nova3d.eval.geometry import ChamferResult, VolumeIoUResult
from nova3d.eval.normalize import AlignmentRecord

OK, MISSING, BROKEN = "ok", "missing", "broken"  # ObjectResult.status
CSV_FILE, JSON_FILE, MD_FILE = "per_object.csv", "summary.json", "summary.md"


@dataclass(frozen=True)
class Metric:
    name: str  # key in ObjectResult.scalars(), summary.json and the CSV header
    label: str  # markdown column header
    higher_is_better: bool


METRICS = (
    Metric("chamfer", "CD", False), Metric("fscore", "F-score", True), Metric("volume_iou", "IoU", True),
    Metric("psnr", "PSNR", True), Metric("ssim", "SSIM", True), Metric("lpips", "LPIPS", False),
    Metric("chamfer_depth", "CD (depth)", False), Metric("cd_accuracy", "CD pred→gt", False),
    Metric("cd_completeness", "CD gt→pred", False), Metric("precision", "precision", True),
    Metric("recall", "recall", True),
    Metric("consistency_psnr", "consistency PSNR", True), Metric("consistency_ssim", "consistency SSIM", True),
    Metric("consistency_normal_deg", "consistency normal °", False),
)
CONSISTENCY_METRICS = ("consistency_psnr", "consistency_ssim", "consistency_normal_deg")
# The columns of summary.md (and of `nova3d report`, from summary.json's means): consistency is one
# column, its PSNR; its SSIM and normal error are in per_object.csv and summary.json.
MD_METRICS = ("chamfer", "chamfer_depth", "fscore", "volume_iou", "psnr", "ssim", "lpips", "consistency_psnr")


def json_float(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else str(x)


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 2 and float(x).is_integer():  # counts (IoU / F-score of exactly 1 keep their digits)
        return str(int(x))
    return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.2f}"


@dataclass
class ObjectResult:
    """What happened to one ground-truth object; metrics are None unless status is OK."""

    object_id: str
    status: str  # OK | MISSING | BROKEN
    pred_path: str | None = None
    reason: str | None = None  # why it was not evaluated
    chamfer: ChamferResult | None = None  # surface samples
    chamfer_depth: ChamferResult | None = None  # depth renders (when the protocol asks)
    iou: VolumeIoUResult | None = None
    appearance: AppearanceResult | None = None
    alignment: AlignmentRecord | None = None
    pred_colour: str | None = None  # "texture" | "vertex" | "face" | "none": what the renders show
    gt_resolution: int | None = None  # the GT views' size before resizing to the protocol's
    appearance_source: str | None = None  # "mesh_renders" | "generated_views"
    appearance_reason: str | None = None  # why appearance is missing for an evaluated object
    consistency: ConsistencyResult | None = None  # `nova3d eval --consistency`
    consistency_reason: str | None = None  # why it is missing where it was asked for
    seconds: float = 0.0

    def scalars(self) -> dict[str, float | None]:
        c, d, a = self.chamfer, self.chamfer_depth, self.appearance
        return {"chamfer": c and c.chamfer, "fscore": c and c.fscore,
                "volume_iou": self.iou and self.iou.iou, "psnr": a and a.psnr, "ssim": a and a.ssim,
                "lpips": a and a.lpips, "chamfer_depth": d and d.chamfer, "cd_accuracy": c and c.accuracy,
                "cd_completeness": c and c.completeness, "precision": c and c.precision,
                "recall": c and c.recall, **self.consistency_scalars()}

    def consistency_scalars(self) -> dict[str, float | None]:
        scores = self.consistency.scalars() if self.consistency is not None else {}
        return {name: scores.get(name) for name in CONSISTENCY_METRICS}

    def to_json(self) -> dict:
        part = lambda r: None if r is None else r.to_json()  # noqa: E731
        return {"object_id": self.object_id, "status": self.status, "pred_path": self.pred_path,
                "reason": self.reason, "scalars": {k: json_float(v) for k, v in self.scalars().items()},
                "chamfer": part(self.chamfer), "chamfer_depth": part(self.chamfer_depth),
                "volume_iou": part(self.iou), "appearance": part(self.appearance),
                "alignment": part(self.alignment), "pred_colour": self.pred_colour,
                "gt_resolution": self.gt_resolution, "appearance_source": self.appearance_source,
                "appearance_reason": self.appearance_reason, "consistency": part(self.consistency),
                "consistency_reason": self.consistency_reason, "seconds": self.seconds}


@dataclass
class EvalSummary:
    protocol: dict  # EvalProtocol fields
    protocol_overrides: dict  # fields changed from the named protocol (CLI options)
    objects: list[ObjectResult]
    lpips_reason: str | None  # None: LPIPS computed
    versions: dict[str, str]
    environment: dict  # device, render backend, NN backend
    pred_dir: str | None  # None, with gt_dir: a consistency-only evaluation (no ground truth)
    gt_dir: str | None
    unmatched_predictions: list[str] = field(default_factory=list)  # files with no GT object
    seconds: float = 0.0
    views_dir: str | None = None  # generated views (protocols scoring them; consistency)
    consistency: dict | None = None  # nova3d.eval.consistency settings when it was scored, else None

    def warnings(self) -> list[str]:
        """What a reader of the numbers must know: meshes partly outside a fixed IoU grid, objects
        without appearance metrics, PSNR values at the cap."""
        out = []
        clipped = [o.object_id for o in self.evaluated if o.iou and max(o.iou.pred_outside_grid, o.iou.gt_outside_grid) > 0]
        if clipped:
            out.append(f"IoU grid `{self.protocol.get('iou_grid')}` does not hold every vertex of "
                       f"{', '.join(clipped)}: what lies outside the grid is not counted")
        no_app = [f"{o.object_id} ({o.appearance_reason})" for o in self.evaluated if o.appearance is None]
        if no_app:
            out.append("no appearance metrics for " + "; ".join(no_app))
        capped = sum(o.appearance.psnr_capped_views for o in self.evaluated if o.appearance)
        if capped:
            out.append(f"{capped} view(s) at the PSNR cap of {self.protocol.get('psnr_max_db')} dB (identical images)")
        no_cons = [f"{o.object_id} ({o.consistency_reason})" for o in self.evaluated
                   if self.consistency is not None and o.consistency is None]
        if no_cons:
            out.append("no consistency score for " + "; ".join(no_cons))
        return out

    @property
    def evaluated(self) -> list[ObjectResult]:
        return [o for o in self.objects if o.status == OK]

    @property
    def not_evaluated(self) -> list[ObjectResult]:
        return [o for o in self.objects if o.status != OK]

    def counts(self) -> dict[str, int]:
        return {"objects": len(self.objects), OK: len(self.evaluated),
                MISSING: sum(o.status == MISSING for o in self.objects),
                BROKEN: sum(o.status == BROKEN for o in self.objects)}

    def aggregate(self, how: str) -> dict[str, float | None]:
        """{metric: mean or median over evaluated objects}; None where no object has it."""
        reduce = {"mean": lambda v: math.fsum(v) / len(v) if all(map(math.isfinite, v)) else max(v),
                  "median": statistics.median}[how]
        out = {}
        for m in METRICS:
            values = [o.scalars()[m.name] for o in self.evaluated]
            values = [v for v in values if v is not None]
            out[m.name] = reduce(values) if values else None
        return out

    def to_json(self) -> dict:
        return {
            "protocol": self.protocol, "protocol_overrides": self.protocol_overrides,
            "counts": self.counts(),
            "mean": {k: json_float(v) for k, v in self.aggregate("mean").items()},
            "median": {k: json_float(v) for k, v in self.aggregate("median").items()},
            "not_evaluated": [{"object_id": o.object_id, "status": o.status, "pred_path": o.pred_path,
                               "reason": o.reason} for o in self.not_evaluated],
            "unmatched_predictions": self.unmatched_predictions,
            "lpips": {"status": "computed" if self.lpips_reason is None else "unavailable",
                      "reason": self.lpips_reason, "net": self.protocol.get("lpips_net")},
            "versions": self.versions, "environment": self.environment,
            "pred_dir": self.pred_dir, "gt_dir": self.gt_dir, "views_dir": self.views_dir,
            "consistency": self.consistency,
            "warnings": self.warnings(), "seconds": self.seconds,
            "objects": [o.to_json() for o in self.objects],
        }

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        names = [m.name for m in METRICS]
        writer.writerow(["object_id", "status", *names, "normalization", "icp", "icp_rmse_after",
                         "pred_colour", "seconds", "pred_path", "reason", "appearance_source", "appearance_reason",
                         "consistency_reason"])
        for o in self.objects:
            s = o.scalars()
            icp = o.alignment.icp if o.alignment else None
            writer.writerow([o.object_id, o.status, *["" if s[n] is None else repr(float(s[n])) for n in names],
                             o.alignment.mode if o.alignment else "", bool(icp) if o.alignment else "",
                             "" if icp is None else repr(icp.rmse_after), o.pred_colour or "",
                             f"{o.seconds:.3f}", o.pred_path or "", o.reason or "",
                             o.appearance_source or "", o.appearance_reason or "", o.consistency_reason or ""])
        return buf.getvalue()

    def _consistency_line(self, one_column: bool = True) -> str:
        s = self.consistency or {}
        size = f"{s['image_size']}²" if s.get("image_size") else "the views' own size"
        return (f"Consistency (no ground truth; nova3d.eval.consistency): fuse the even views, render at the odd "
                f"ones and compare, and the reverse; mean of the two. Fusion `{s.get('experiment')}` with "
                f"{' '.join(s.get('overrides', []))}; scored at {size}."
                + (" Its SSIM and normal error (°) are in per_object.csv and summary.json." if one_column else ""))

    def _consistency_markdown(self) -> str:
        """The table of a consistency-only evaluation (no ground truth)."""
        c = self.counts()
        cols = [m for m in METRICS if m.name in CONSISTENCY_METRICS]
        lines = [f"## Evaluation — multi-view consistency of `{self.views_dir}`", "",
                 f"Object folders: {c['objects']}; {c[OK]} scored, {c[BROKEN]} broken.", "",
                 self._consistency_line(one_column=False),
                 "", "| object | " + " | ".join(f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in cols)
                 + " | status |", "|---|" + "---|" * len(cols) + "---|"]
        for o in self.objects:
            s = o.scalars()
            status = o.status if o.status == OK else f"{o.status}: {o.reason}"
            lines.append(f"| {o.object_id} | " + " | ".join(fmt(s[m.name]) for m in cols)
                         + f" | {status.replace('|', '/')} |")
        agg = self.aggregate("mean")
        lines.append(f"| **mean** ({c[OK]}) | " + " | ".join(fmt(agg[m.name]) for m in cols) + " | |")
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        if self.gt_dir is None:
            return self._consistency_markdown()
        p, c = self.protocol, self.counts()
        cols = [m for m in METRICS if m.name in MD_METRICS
                and (m.name != "chamfer_depth" or p.get("chamfer_depth"))
                and (m.name not in CONSISTENCY_METRICS or self.consistency is not None)]
        arrow = lambda m: "↑" if m.higher_is_better else "↓"  # noqa: E731
        changed = ", ".join(f"{k}={v}" for k, v in self.protocol_overrides.items())
        cd = {"surface": f"{p['chamfer_points']} surface points per mesh",
              "vertices": "the meshes' vertices",
              "depth": f"depth renders ({p['depth_cameras']} cameras), voxel {p['depth_voxel_size']}"}[p["chamfer"]]
        alias = f" (asked for as `{p['requested_as']}`)" if p.get("alias_of") else ""
        lines = [
            f"## Evaluation — protocol `{p['name']}`{alias}" + (f" (changed: {changed})" if changed else ""),
            "",
            f"{c['objects']} objects: {c[OK]} evaluated, {c[MISSING]} missing, {c[BROKEN]} broken. "
            f"Normalisation `{p['normalization']}` (prediction frame `{p['pred_frame']}`), ICP "
            f"{'on' if p['icp'] else 'off'}; CD from {cd}; F-score at {p['fscore_threshold']} (nova3d's "
            f"addition: no peer protocol reports it); IoU on {p['iou_resolution']}³ ({p['iou_grid']}, "
            f"{p['iou_inside']}); {p['appearance']} against {p['num_views']} GT views at {p['image_size']}² on "
            f"white ({p['appearance_views']} views), SSIM `{p['ssim']}`, PSNR capped at {p['psnr_max_db']} dB.",
            "",
            f"LPIPS ({p['lpips_net']}): " + ("computed." if self.lpips_reason is None
                                              else f"not computed — {self.lpips_reason}."),
            "",
            *([self._consistency_line(), ""] if self.consistency is not None else []),
            "| object | " + " | ".join(f"{m.label} {arrow(m)}" for m in cols) + " | status |",
            "|---|" + "---|" * len(cols) + "---|",
        ]
        for o in self.objects:
            s = o.scalars()
            status = o.status if o.status == OK else f"{o.status}: {o.reason}"
            lines.append(f"| {o.object_id} | " + " | ".join(fmt(s[m.name]) for m in cols)
                         + f" | {status.replace('|', '/')} |")
        for how in ("mean", "median"):
            agg = self.aggregate(how)
            lines.append(f"| **{how}** ({c[OK]}) | " + " | ".join(fmt(agg[m.name]) for m in cols) + " | |")
        if self.unmatched_predictions:
            lines += ["", "Predictions without a ground-truth object (not evaluated): "
                      + ", ".join(self.unmatched_predictions)]
        for warning in self.warnings():
            lines += ["", f"Warning: {warning}."]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        names = {"csv": CSV_FILE, "json": JSON_FILE, "md": MD_FILE}
        with staged_dir(out, "nova3d eval") as stage:
            (stage / CSV_FILE).write_text(self.csv_text())
            write_json_atomic(stage / JSON_FILE, self.to_json())
            (stage / MD_FILE).write_text(self.markdown())
        paths = {kind: out / name for kind, name in names.items()}
        return paths
