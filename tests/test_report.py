"""`nova3d report`: fabricated run directories (real TensorBoard event files written with
SummaryWriter, small config.yaml / metrics.json / eval/summary.json) -> the ablation table and
the TensorBoard hparams that read back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from nova3d import cli
from nova3d.errors import Nova3DError
from nova3d.eval import report as R

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(folder: Path, values: dict[str, list[tuple[int, float]]]) -> None:
    with SummaryWriter(log_dir=str(folder)) as w:
        for tag, points in values.items():
            for step, value in points:
                w.add_scalar(tag, value, step)


def diffusion_run(root: Path, name: str, gta: bool, losses: list[float], chamfer: float | None = None) -> Path:
    run = root / name.replace("/", "_") / "local"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"name": name, "seed": 0, "model": {"gta_spatial": gta, "gta_temporal": gta, "domains": ["rgb", "normal"]},
         "system": {"lr": 1e-5}}))
    # The final value is the last step's, not the best: losses[-1] is not the minimum below.
    scalars(run / "tensorboard" / "version_0", {"val/loss": list(enumerate(losses)),
                                                "train/loss": [(0, 9.0), (1, 8.0)]})
    if chamfer is not None:
        (run / "eval").mkdir()
        (run / "eval" / "summary.json").write_text(json.dumps(
            {"mean": {"chamfer": chamfer, "volume_iou": 0.6, "psnr": "inf", "lpips": None},
             "counts": {"ok": 30}}))
    return run


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    full = diffusion_run(tmp_path, "gta_full", True, [0.5, 0.30, 0.31], chamfer=0.0212)
    no_gta = diffusion_run(tmp_path, "ablations/no_gta", False, [0.6, 0.40, 0.45], chamfer=0.0427)
    fusion = tmp_path / "fusion_out"
    fusion.mkdir()
    (fusion / "config.yaml").write_text(yaml.safe_dump({"name": "fusion/no_conflict",
                                                        "loss": {"conflict_maps": False}}))
    (fusion / "metrics.json").write_text(json.dumps({"experiment": "fusion/no_conflict", "psnr_mesh_vs_views": 24.5,
                                                     "seconds_fit": 12.0, "device": "cpu"}))
    scalars(fusion / "tensorboard", {"loss/total": [(0, 1.0), (99, 0.2)]})
    return [full, no_gta, fusion]


def test_collect_run_reads_every_source(runs: list[Path]) -> None:
    full = R.collect_run(runs[0])
    assert full.experiment == "gta_full" and full.config["model.gta_spatial"] is True
    assert full.metrics["val/loss"] == pytest.approx(0.31)  # the last step, not the minimum
    assert "train/loss" not in full.metrics  # not a default tag
    assert full.metrics["eval/chamfer"] == 0.0212 and full.metrics["eval/psnr"] == float("inf")
    assert "eval/lpips" not in full.metrics  # unavailable LPIPS stays absent, never a number
    fusion = R.collect_run(runs[2])
    assert fusion.experiment == "fusion/no_conflict" and fusion.metrics["loss/total"] == pytest.approx(0.2)
    assert fusion.metrics["psnr_mesh_vs_views"] == 24.5 and "device" not in fusion.metrics


def test_resumed_run_takes_the_latest_step_across_event_folders(tmp_path: Path) -> None:
    run = diffusion_run(tmp_path, "gta_full", True, [0.5, 0.4])
    scalars(run / "tensorboard" / "version_1", {"val/loss": [(2, 0.35), (3, 0.33)]})  # the resumed job
    assert R.collect_run(run).metrics["val/loss"] == pytest.approx(0.33)


def test_table_bold_best_and_delta_vs_baseline(runs: list[Path]) -> None:
    report = R.build_report(runs)
    assert report.baseline.experiment == "gta_full" and report.primary == "eval/chamfer"
    assert report.columns[:3] == ["eval/chamfer", "eval/volume_iou", "eval/psnr"]
    md = report.markdown()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert "Δ eval/chamfer vs gta_full" in header
    main, change = md.split("### Change vs")
    row = {line.split(" | ")[0].strip("| "): line for line in main.splitlines() if line.startswith("| ")}
    delta = {line.split(" | ")[0].strip("| "): line for line in change.splitlines() if line.startswith("| ")}
    assert "**0.0212**" in row["gta_full"] and "**0.3100**" in row["gta_full"]  # lower CD / loss is better
    assert "| 24.50 |" in row["fusion/no_conflict"]  # the only run with it: nothing to be best of
    assert "+0.0215 (+101.4%)" in row["ablations/no_gta"] and "baseline" in row["gta_full"]
    assert "+0.14 (+45.2%)" in delta["ablations/no_gta"] and "+0.0215" in delta["ablations/no_gta"]
    assert report.delta(report.runs[1], "val/loss") == pytest.approx(0.14)
    by_name = R.build_report(runs, baseline="ablations/no_gta", metrics=["eval/*", "val/*"])
    assert by_name.baseline.experiment == "ablations/no_gta"
    assert by_name.columns == ["eval/chamfer", "eval/volume_iou", "eval/psnr", "eval/objects_evaluated", "val/loss"]
    assert by_name.delta(by_name.runs[0], "eval/chamfer") == pytest.approx(-0.0215)


def test_direction_from_names() -> None:
    assert R.direction("eval/psnr") == 1 and R.direction("eval/volume_iou") == 1
    assert R.direction("val/loss_rgb") == -1 and R.direction("eval/chamfer") == -1
    assert R.direction("pose/rotation_error_deg") == -1 and R.direction("conflict_mean") == 0


def test_hparams_are_readable_by_tensorboard(runs: list[Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    md, root = R.write_report(R.build_report(runs), tmp_path / "out" / "ablations.md")
    assert md.read_text().startswith("## Ablations")
    sessions = sorted(p for p in root.iterdir() if p.is_dir())
    assert [p.name for p in sessions] == ["ablations_no_gta", "fusion_no_conflict", "gta_full"]
    keys = []
    for folder in sessions:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        keys.append(sorted(start.hparams))
        assert {m.name.tag for m in experiment.metric_infos} >= {"report/eval/chamfer", "report/val/loss"}
        # Booleans are shown as text; "—": the fusion run's config has no such key.
        gta = {"gta_full": "True", "ablations_no_gta": "False", "fusion_no_conflict": "—"}[folder.name]
        assert start.hparams["model.gta_spatial"].string_value == gta
        if folder.name == "gta_full":
            assert acc.Scalars("report/eval/chamfer")[0].value == pytest.approx(0.0212)
    assert keys[0] == keys[1] == keys[2] and "model.gta_spatial" in keys[0]
    R.write_report(R.build_report(runs[:2]), tmp_path / "out" / "ablations.md")  # replaces, never mixes
    sessions = [p for p in root.iterdir() if p.is_dir()]
    assert len(sessions) == 2
    acc = EventAccumulator(str(sessions[0]))
    acc.Reload()
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG])
    # Only what differs between the two diffusion runs (plus which run it is).
    assert sorted(start.hparams) == ["experiment", "model.gta_spatial", "model.gta_temporal", "run_dir"]
    assert start.hparams["model.gta_spatial"].string_value in ("True", "False")  # not torch's 0/1


def test_bad_runs_are_one_line_errors(runs: list[Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(Nova3DError, match="not a run directory"):
        R.collect_run(tmp_path / "empty")
    with pytest.raises(Nova3DError, match="--baseline 'nope' names none of the runs"):
        R.build_report(runs, baseline="nope")
    (runs[2] / "metrics.json").write_text("{broken")
    with pytest.raises(Nova3DError, match="metrics.json: cannot be read"):
        R.collect_run(runs[2])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "hparams").mkdir()  # someone else's folder of that name
    (tmp_path / "mine" / "hparams" / "theirs.txt").write_text("keep me")
    with pytest.raises(Nova3DError, match="nova3d did not write"):
        R.write_report(R.build_report(runs[:2]), tmp_path / "mine" / "table.md")


def test_cli_report(runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "report" / "table.md"
    assert cli.main(["report", *map(str, runs[:2]), "--out", str(out), "--primary", "val/loss"]) == 0
    printed = capsys.readouterr().out
    assert "Δ val/loss vs gta_full" in printed and out.is_file() and (out.parent / "hparams").is_dir()
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("run directory not found")
