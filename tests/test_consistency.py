"""The ground-truth-free consistency score (nova3d/eval/consistency.py, consistency_eval.py,
`nova3d eval --consistency`, `nova3d report`). Fast tier: the synthetic ellipsoid of
tests/helpers_objects.py (ray-traced, exact normals) with an oracle mesh standing in for the fit,
and one real fit at a few steps for the CLI; the slow tier ranks Blender renders against
`nova3d perturb`-ed and shuffled copies (bench/consistency_ranking.py)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from nova3d import cli
from nova3d.cameras import Cameras
from nova3d.data.shards import read_object_folder
from nova3d.errors import Nova3DError
from nova3d.eval import consistency as C
from nova3d.eval.report import build_report
from nova3d.fusion.views import load_views
from tests.helpers_objects import RADII, make_object_folder

pytestmark = pytest.mark.usefixtures("one_thread")
# A real fit small enough for the fast tier: a few steps at 32², a coarse marching-cubes grid.
TINY = ["optim.fit_resolution=32", "optim.steps=6", "optim.rays=128", "export.resolution=32",
        "render.num_steps=32", "render.occupancy.resolution=16"]


@pytest.fixture(scope="module")
def ellipsoid(tmp_path_factory) -> Path:
    return make_object_folder(tmp_path_factory.mktemp("views"), "ellipsoid", views=16, res=48)


def oracle_mesh(scale: float = 1.0, shift=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    """The ellipsoid of helpers_objects with its colour pattern as vertex colours (scaled/shifted:
    a wrong reconstruction)."""
    mesh = trimesh.creation.icosphere(subdivisions=4)
    mesh.vertices = mesh.vertices * np.array(RADII) * scale + np.array(shift)
    p = torch.tensor(np.array(mesh.vertices), dtype=torch.float32)
    n = torch.tensor(np.array(mesh.vertex_normals), dtype=torch.float32)
    light = torch.nn.functional.normalize(torch.tensor([0.3, -0.8, 0.5]), dim=0)
    shade = 0.35 + 0.65 * (n @ light).clamp_min(0)
    pattern = 0.5 + 0.5 * torch.stack([torch.sin(9 * p[:, 0]), torch.sin(7 * p[:, 2] + 1), torch.cos(8 * p[:, 1])], -1)
    rgb = (pattern * shade[:, None]).clamp(0, 1).numpy()
    rgba = np.concatenate([np.round(rgb * 255).astype(np.uint8), np.full((len(rgb), 1), 255, np.uint8)], 1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh


def test_split_is_even_odd_and_each_view_held_out_once(ellipsoid: Path) -> None:
    even, odd = C.split_views(16)
    assert even == list(range(0, 16, 2)) and odd == list(range(1, 16, 2))
    with pytest.raises(Nova3DError, match="at least 4 views"):
        C.split_views(3)
    views = load_views(ellipsoid)
    seen = []

    def fitter(half):  # records which cameras each fit got, in which order
        seen.append(half)
        return oracle_mesh()

    result = C.object_consistency(ellipsoid, C.ConsistencySettings(image_size=64), fitter=fitter)
    assert result.image_size == 48  # never above the views' own size
    assert [(d.fitted, d.held_out) for d in result.directions] == [(even, odd), (odd, even)]
    assert sorted(sum((d.held_out for d in result.directions), [])) == list(range(16))
    for half, idx in zip(seen, (even, odd)):
        assert half.num_views == 8 and half.cameras.input_view == 0  # each half anchored at its first view
        assert torch.equal(half.cameras.c2w, views.cameras.c2w[idx])
        assert torch.equal(half.rgb, views.rgb[idx]) and torch.equal(half.normal, views.normal[idx])
        assert half.cameras.normal_frame == "world"  # load_views already turned the normals
    # The oracle is right from both sides: the two directions agree, and the mean is theirs.
    a, b = result.directions
    assert abs(a.psnr - b.psnr) < 2.0 and math.isclose(result.psnr, (a.psnr + b.psnr) / 2)


def test_identical_views_score_at_the_cap_and_differences_lower_it() -> None:
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(3, 3, 32, 32, generator=g)
    normal = torch.nn.functional.normalize(torch.randn(3, 3, 32, 32, generator=g), dim=1)
    mask = torch.ones(3, 32, 32)
    psnr, ssim, deg, iou = C.score_views(rgb, normal, mask, rgb, normal, mask)
    assert psnr == [100.0] * 3 and min(ssim) > 0.999 and max(deg) < 0.1 and iou == [1.0] * 3
    # A 30 deg turn of every normal about an axis orthogonal to it reads as 30 deg.
    axis = torch.nn.functional.normalize(torch.cross(normal, torch.randn_like(normal), dim=1), dim=1)
    turned = normal * math.cos(math.radians(30)) + axis * math.sin(math.radians(30))
    noisy = (rgb + 0.1 * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
    half = mask.clone()
    half[:, :, 16:] = 0
    psnr2, ssim2, deg2, iou2 = C.score_views(noisy, turned, half, rgb, normal, mask)
    assert max(psnr2) < 30 and max(ssim2) < min(ssim) and all(abs(d - 30) < 0.5 for d in deg2)
    assert all(abs(i - 0.5) < 1e-6 for i in iou2)


def test_an_oracle_mesh_scores_high_and_wrong_meshes_lower(ellipsoid: Path) -> None:
    settings = C.ConsistencySettings(image_size=None)
    right = C.object_consistency(ellipsoid, settings, fitter=lambda half: oracle_mesh())
    assert right.psnr > 25 and right.ssim > 0.95 and right.normal_deg < 2 and right.mask_iou > 0.95
    for wrong in (oracle_mesh(scale=1.15), oracle_mesh(shift=(0.06, 0, 0))):
        r = C.object_consistency(ellipsoid, settings, fitter=lambda half: wrong)
        assert r.psnr < right.psnr - 5 and r.normal_deg > right.normal_deg + 3 and r.mask_iou < right.mask_iou - 0.05


def test_bad_folders_fail_with_one_line_naming_the_file(ellipsoid: Path, tmp_path: Path, capsys) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ellipsoid, broken)
    (broken / "cameras.json").write_text("{not json")
    with pytest.raises(Nova3DError, match="cameras.json"):
        C.object_consistency(broken, fitter=lambda half: oracle_mesh())
    (tmp_path / "empty").mkdir()
    with pytest.raises(Nova3DError, match="no subfolder holds one"):
        C.object_folders(tmp_path / "empty")
    assert cli.main(["eval", "--consistency", "--views", str(broken), "--out", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("nova3d eval: error: no object folder could be scored: ")
    assert "cameras.json" in err and str(broken) in err
    row = next(csv.DictReader((tmp_path / "o1" / "per_object.csv").open()))  # the reason is kept, as eval does
    assert row["status"] == "broken" and "cameras.json" in row["reason"]
    assert cli.main(["eval", "--consistency", "--views", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    assert "nowhere: views folder not found" in capsys.readouterr().err
    assert cli.main(["eval", "--consistency", "--views", str(ellipsoid), "--out", str(tmp_path / "o3"),
                     "--consistency-set", "optim.stepz=3"]) == 2  # a misspelt key fails before any fit
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stepz" in err
    assert cli.main(["eval", "--consistency", "--out", str(tmp_path / "o4")]) == 2
    assert "--views" in capsys.readouterr().err
    with pytest.raises(Nova3DError, match="at least 8"):
        C.object_consistency(ellipsoid, C.ConsistencySettings(image_size=4), fitter=lambda half: oracle_mesh())


def test_eval_and_report_get_a_consistency_column(ellipsoid: Path, tmp_path: Path, capsys) -> None:
    """No ground truth: `nova3d eval --consistency` on a folder of object folders, a real (tiny) fit;
    then `nova3d report` on the run shows the column."""
    views = tmp_path / "views"
    views.mkdir()
    (views / "ellipsoid").symlink_to(ellipsoid, target_is_directory=True)
    (views / "not_views").mkdir()  # a subfolder without cameras.json is not an object
    out = tmp_path / "run" / "eval"
    assert cli.main(["eval", "--consistency", "--views", str(views), "--out", str(out), "--consistency-size", "32",
                     "--consistency-set", *TINY]) == 0
    md = (out / "summary.md").read_text()
    assert "consistency PSNR ↑" in md and "| ellipsoid |" in md and "optim.steps=6" in md
    row = next(csv.DictReader((out / "per_object.csv").open()))
    assert row["status"] == "ok" and math.isfinite(float(row["consistency_psnr"]))
    assert 0 <= float(row["consistency_normal_deg"]) <= 180 and 0 < float(row["consistency_ssim"]) <= 1
    data = json.loads((out / "summary.json").read_text())
    assert data["mean"]["consistency_psnr"] == pytest.approx(float(row["consistency_psnr"]))
    assert data["consistency"]["experiment"] == C.CONSISTENCY_EXPERIMENT and data["gt_dir"] is None
    record = data["objects"][0]["consistency"]
    assert [d["held_out"] for d in record["directions"]] == [list(range(1, 16, 2)), list(range(0, 16, 2))]
    capsys.readouterr()
    report = build_report([tmp_path / "run"])
    assert "eval/consistency_psnr" in report.columns
    assert report.runs[0].metrics["eval/consistency_psnr"] == pytest.approx(data["mean"]["consistency_psnr"])
    assert "eval/consistency_psnr ↑" in report.markdown()


def test_eval_with_ground_truth_adds_the_column(tmp_path: Path, monkeypatch) -> None:
    """With --pred/--gt, each evaluated object gets the score of VIEWS/<id>/; one without views is
    listed with the reason. The fit is replaced by an oracle: this checks the plumbing."""
    from nova3d.eval import consistency_eval
    from tests.helpers_eval import write_gt_object

    gt = tmp_path / "gt"
    for name, mesh in (("mug", trimesh.creation.box()), ("crate", trimesh.creation.icosphere(subdivisions=2))):
        write_gt_object(gt, name, mesh, views=16, res=32, elevation_deg=0.0)
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in ("mug", "crate"):
        (pred / f"{name}.glb").write_bytes((gt / name / "mesh.glb").read_bytes())
    views = tmp_path / "views"
    make_object_folder(views, "mug", views=16, res=32)  # no views for crate
    real = C.object_consistency
    monkeypatch.setattr(consistency_eval, "object_consistency",
                        lambda folder, settings: real(folder, settings, fitter=lambda half: oracle_mesh()))
    out = tmp_path / "eval"
    assert cli.main(["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--views", str(views),
                     "--consistency", "--consistency-size", "32"]) == 0
    rows = {r["object_id"]: r for r in csv.DictReader((out / "per_object.csv").open())}
    assert float(rows["mug"]["consistency_psnr"]) > 25 and rows["mug"]["consistency_reason"] == ""
    assert rows["crate"]["consistency_psnr"] == "" and "not found" in rows["crate"]["consistency_reason"]
    assert rows["crate"]["status"] == "ok" and float(rows["crate"]["chamfer"]) == 0.0  # GT metrics unaffected
    md = (out / "summary.md").read_text()
    assert "consistency PSNR ↑" in md and "no consistency score for crate" in md


def test_without_consistency_eval_has_no_such_column(tmp_path: Path) -> None:
    from tests.helpers_eval import write_gt_object

    gt = tmp_path / "gt"
    write_gt_object(gt, "mug", trimesh.creation.box(), views=16, res=32, elevation_deg=0.0)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "mug.glb").write_bytes((gt / "mug" / "mesh.glb").read_bytes())
    out = tmp_path / "eval"
    assert cli.main(["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    assert "consistency" not in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["consistency"] is None


def test_shuffled_folders_put_every_non_input_view_at_a_wrong_camera(ellipsoid: Path, tmp_path: Path) -> None:
    from bench.consistency_ranking import shuffle_views

    order = shuffle_views(ellipsoid, tmp_path / "shuffled", seed=3)
    assert order[0] == 0 and sorted(order) == list(range(16)) and all(order[i] != i for i in range(1, 16))
    src, dst = read_object_folder(ellipsoid), read_object_folder(tmp_path / "shuffled")
    assert np.array_equal(dst.rgba, src.rgba[order]) and np.array_equal(dst.normal, src.normal[order])
    assert np.array_equal(dst.mask, src.mask[order])
    assert torch.equal(Cameras.load(tmp_path / "shuffled" / "cameras.json").c2w, src.cameras.c2w)


@pytest.mark.slow
def test_ranks_clean_above_perturbed_above_shuffled(tmp_path: Path) -> None:
    """Blender renders of one procedural object at 64², at the default consistency budget."""
    from bench.consistency_ranking import run

    rows = run(["mug"], tmp_path, resolution=64, log=lambda s: None)
    scores, order = rows[0]["scores"], rows[0]["in_order"]
    assert order["psnr"], scores
    assert scores["shuffled"]["consistency_normal_deg"] > scores["clean"]["consistency_normal_deg"], scores
    assert (tmp_path / "ranking.md").is_file() and json.loads((tmp_path / "ranking.json").read_text())["rows"]
