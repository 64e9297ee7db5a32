"""`nova3d report RUN_DIR...`: one ablation table comparing runs (markdown + TensorBoard hparams).

For each run directory it collects
  - the experiment name and config: `config.yaml` (nova3d/run_dir.py for diffusion runs,
    nova3d/fuse.py for fusion runs; its `name`), else `metrics.json`'s "experiment";
  - `metrics.json` if present (fusion runs: a flat {name: number} dict plus "experiment");
  - the final value (largest step, then latest wall time) of TensorBoard scalars under the run
    dir whose tags match `tags` (default: val/*, test/*, loss/total, pose/*), read with
    tensorboard's EventAccumulator from every folder holding event files (resumed runs too);
  - `eval/summary.json` if `nova3d eval ... --out RUN/eval` was run: the means, as eval/<metric>
    (results.MD_METRICS; with `--consistency`, eval/consistency_psnr, the ground-truth-free score).
The table has one row per run, one column per metric, the best value of each column in bold
(when the metric's direction is known from its name) and a "Δ vs baseline" column for the
primary metric (the first of PRIMARY that exists, or `primary`); a second table gives the change
of every metric. `write_hparams` logs each run with SummaryWriter.add_hparams (the config keys
that differ between runs as hparams) so TensorBoard's HPARAMS tab compares them.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nova3d.atomic import atomic_path, staged_dir
from nova3d.errors import Nova3DError
from nova3d.eval.results import JSON_FILE, MD_METRICS, fmt

DEFAULT_TAGS = ("val/*", "test/*", "loss/total", "pose/*")
PRIMARY = ("eval/chamfer", "val/loss", "loss/total")
EVAL_DIR = "eval"
HPARAMS_DIR = "hparams"
_HIGHER = ("psnr", "ssim", "iou", "fscore", "f_score", "precision", "recall")
_LOWER = ("loss", "chamfer", "lpips", "error", "seconds", "cd_")


def direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if the name does not say."""
    name = metric.lower().rsplit("/", 1)[-1]
    if any(k in name for k in _HIGHER):
        return 1
    return -1 if any(k in name for k in _LOWER) else 0


@dataclass
class RunRecord:
    path: Path
    experiment: str
    config: dict = field(default_factory=dict)  # flattened: {"model.gta_spatial": False, ...}
    metrics: dict[str, float] = field(default_factory=dict)
    label: str = ""  # unique row name (experiment, plus the folder name when two runs share it)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _read(path: Path, loader):
    try:
        return loader(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise Nova3DError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def final_scalars(run: Path, tags: tuple[str, ...] = DEFAULT_TAGS) -> dict[str, float]:
    """{tag: value at the last step} over every TensorBoard event folder under `run`."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    best: dict[str, tuple[int, float, float]] = {}
    folders = sorted({p.parent for p in run.rglob("events.out.tfevents.*")
                      if HPARAMS_DIR not in p.relative_to(run).parts})
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get(SCALARS, []):
            if not any(fnmatch.fnmatchcase(tag, t) for t in tags):
                continue
            for event in acc.Scalars(tag):
                key = (event.step, event.wall_time, float(event.value))
                if tag not in best or key[:2] > best[tag][:2]:
                    best[tag] = key
    return {tag: value for tag, (_, _, value) in sorted(best.items())}


def collect_run(path: str | Path, tags: tuple[str, ...] = DEFAULT_TAGS) -> RunRecord:
    """What one run directory holds (module docstring); Nova3DError if it holds nothing usable."""
    path = Path(path)
    if not path.is_dir():
        raise Nova3DError(f"{path}: run directory not found")
    record = RunRecord(path, experiment=path.name)
    found = False
    if (path / "config.yaml").is_file():
        cfg = _read(path / "config.yaml", yaml.safe_load) or {}
        record.config = _flatten(cfg) if isinstance(cfg, dict) else {}
        record.experiment = str(cfg.get("name", record.experiment)) if isinstance(cfg, dict) else record.experiment
        found = True
    if (path / "metrics.json").is_file():
        data = _read(path / "metrics.json", json.loads)
        if not isinstance(data, dict):
            raise Nova3DError(f"{path / 'metrics.json'}: expected a JSON object of name: number")
        if "experiment" in data and not (path / "config.yaml").is_file():
            record.experiment = str(data["experiment"])
        record.metrics.update({k: float(v) for k, v in data.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)})
        found = True
    scalars = final_scalars(path, tags)
    record.metrics.update(scalars)
    found = found or bool(scalars)
    summary = path / EVAL_DIR / JSON_FILE
    if summary.is_file():
        data = _read(summary, json.loads)
        means = data.get("mean", {}) if isinstance(data, dict) else {}
        for name in MD_METRICS:
            value = means.get(name)
            if value is not None:
                record.metrics[f"eval/{name}"] = float(value)  # "inf" (identical views) -> inf
        record.metrics["eval/objects_evaluated"] = float(data.get("counts", {}).get("ok", 0))
        found = True
    if not found:
        raise Nova3DError(f"{path}: not a run directory (no config.yaml, metrics.json, TensorBoard "
                          f"events or {EVAL_DIR}/{JSON_FILE})")
    return record


@dataclass
class Report:
    runs: list[RunRecord]
    columns: list[str]
    baseline: RunRecord
    primary: str | None

    def delta(self, run: RunRecord, column: str) -> float | None:
        a, b = run.metrics.get(column), self.baseline.metrics.get(column)
        return None if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) else a - b

    def best(self, column: str) -> float | None:
        d = direction(column)
        values = [r.metrics[column] for r in self.runs if column in r.metrics]
        if d == 0 or len(values) < 2:
            return None
        return max(values) if d > 0 else min(values)

    def markdown(self) -> str:
        arrow = {1: " ↑", -1: " ↓", 0: ""}
        head = ["run", *[c + arrow[direction(c)] for c in self.columns]]
        pd = f"Δ {self.primary} vs {self.baseline.label}" if self.primary else "Δ vs baseline"
        lines = ["## Ablations", "",
                 f"Baseline: `{self.baseline.label}` ({self.baseline.path}). Bold: best per column "
                 "(↑ higher / ↓ lower is better, judged from the metric's name).", "",
                 "| " + " | ".join(head + [pd]) + " |", "|" + "---|" * (len(head) + 1)]
        for run in self.runs:
            cells = [run.label]
            for col in self.columns:
                value = run.metrics.get(col)
                text = fmt(value)
                cells.append(f"**{text}**" if value is not None and value == self.best(col) else text)
            cells.append(self._delta_text(run, self.primary) if self.primary else "—")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"### Change vs `{self.baseline.label}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for run in self.runs:
            lines.append("| " + " | ".join([run.label] + [self._delta_text(run, c) for c in self.columns]) + " |")
        return "\n".join(lines) + "\n"

    def _delta_text(self, run: RunRecord, column: str) -> str:
        if run is self.baseline:
            return "baseline"
        d, b = self.delta(run, column), self.baseline.metrics.get(column)
        if d is None:
            return "—"
        rel = f" ({d / abs(b):+.1%})" if b else ""
        return f"{d:+.4g}{rel}"


def _label_runs(runs: list[RunRecord]) -> None:
    names = [r.experiment for r in runs]
    for r in runs:
        r.label = r.experiment if names.count(r.experiment) == 1 else f"{r.experiment} ({r.path.name})"
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):
        if labels.count(r.label) > 1:
            r.label = f"{r.label} #{i + 1}"


def build_report(run_dirs: list[str | Path], baseline: str | None = None, metrics: list[str] | None = None,
                 primary: str | None = None, tags: tuple[str, ...] = DEFAULT_TAGS) -> Report:
    """Collect every run; `metrics` (globs) picks columns; `baseline` names a run (label,
    experiment or path), default the first."""
    if not run_dirs:
        raise Nova3DError("give at least one run directory")
    runs = [collect_run(p, tags) for p in run_dirs]
    _label_runs(runs)
    seen: list[str] = []
    evals = [f"eval/{m}" for m in MD_METRICS]
    for run in runs:
        seen += [k for k in run.metrics if k not in seen]
    columns = [c for c in evals if c in seen] + sorted(c for c in seen if c not in evals)
    if metrics:
        columns = [c for c in columns if any(fnmatch.fnmatchcase(c, g) for g in metrics)]
    base = runs[0]
    if baseline is not None:
        matches = [r for r in runs if baseline in (r.label, r.experiment, str(r.path), r.path.name)]
        if not matches:
            raise Nova3DError(f"--baseline {baseline!r} names none of the runs: {', '.join(r.label for r in runs)}")
        base = matches[0]
    if primary is not None and primary not in columns:
        raise Nova3DError(f"--primary {primary!r} is not a column; columns: {', '.join(columns) or '(none)'}")
    primary = primary or next((c for c in PRIMARY if c in columns), columns[0] if columns else None)
    return Report(runs, columns, base, primary)


def _hparam_value(value):
    if isinstance(value, bool):  # torch writes bools as numbers (0/1): text reads better in TensorBoard
        return str(value)
    if isinstance(value, (int, float, str)):
        return value
    return "None" if value is None else json.dumps(value)


def write_hparams(report: Report, out_dir: str | Path) -> Path:
    """SummaryWriter.add_hparams per run into out_dir/hparams/<label>/ (replacing an earlier report).

    Every run gets the same hparam keys (config keys whose values differ between the runs, plus
    experiment) and the same metric keys (NaN where a run lacks one), so whichever run TensorBoard
    reads the experiment definition from, it lists every run and column."""
    from torch.utils.tensorboard import SummaryWriter

    root = Path(out_dir) / HPARAMS_DIR
    keys = sorted({k for r in report.runs for k in r.config} - {"name"})  # name: the "experiment" hparam
    varying = [k for k in keys if len({json.dumps(r.config.get(k), default=str) for r in report.runs}) > 1]
    table = []
    for run in report.runs:
        hp = {"experiment": run.experiment, "run_dir": str(run.path)}
        # "—": the key is not in this run's config (a fusion run next to diffusion runs)
        hp.update({k: _hparam_value(run.config[k]) if k in run.config else "—" for k in varying})
        table.append(hp)
    for k in list(table[0]):  # a key whose values mix types is shown as text
        if len({type(h[k]) for h in table}) > 1:
            for h in table:
                h[k] = str(h[k])
    discrete = {k: sorted({h[k] for h in table}, key=str) for k in table[0]
                if isinstance(table[0][k], (str, bool))}
    with staged_dir(root, "nova3d report") as stage, SummaryWriter(log_dir=str(stage)) as writer:
        for run, hp in zip(report.runs, table):
            metrics = {f"report/{c}": run.metrics.get(c, float("nan")) for c in report.columns}
            writer.add_hparams(hp, metrics, hparam_domain_discrete=discrete,
                               run_name=re.sub(r"[^A-Za-z0-9_.-]+", "_", run.label))
    return root


def write_report(report: Report, out_file: str | Path) -> tuple[Path, Path]:
    """The markdown table to out_file and the hparams beside it; each replaced only once written."""
    out_file = Path(out_file)
    if out_file.is_dir():
        raise Nova3DError(f"--out {out_file}: is a folder; give the markdown file to write")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    hparams = write_hparams(report, out_file.parent)
    with atomic_path(out_file) as tmp:
        tmp.write_text(report.markdown())
    return out_file, hparams
