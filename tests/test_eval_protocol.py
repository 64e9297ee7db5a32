"""The evaluation harness (nova3d/eval/protocol.py, results.py, `nova3d eval`): GT folders are
rendered with nova3d.eval.mesh_render (tests/helpers_eval.py, no Blender) at 64², 4 views; the
metrics must reflect what was done to the prediction, and every object must be accounted for."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from data_prep.procedural import make_object
from tests.helpers_eval import write_gt_object
from nova3d import cli, mesh_io
from nova3d.cameras import Cameras
from nova3d.errors import Nova3DError
from nova3d.eval import protocol as P
from nova3d.eval.results import BROKEN, MISSING, OK

pytestmark = pytest.mark.usefixtures("one_thread")
OBJECTS = ("crate", "mug")  # UV texture; vertex colours
SMALL = P.get_protocol("nova3d", num_views=4, image_size=64, chamfer_points=5_000)


@pytest.fixture(scope="module")
def gt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gt")
    for name in OBJECTS:
        write_gt_object(root, name, make_object(name), views=4, res=64, elevation_deg=20.0)
    (root / "logs").mkdir()  # data_prep's own folders are not objects
    return root


def gt_mesh(gt: Path, name: str) -> trimesh.Trimesh:
    return mesh_io.load_mesh(gt / name / P.GT_MESH)


def evaluate(pred: Path, gt: Path, out: Path | None = None, **changes):
    import dataclasses

    return P.evaluate_set(pred, gt, dataclasses.replace(SMALL, **changes), out, progress=False)


def test_identical_prediction_scores_perfectly_in_both_layouts(gt: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    (pred / "mug").mkdir(parents=True)
    shutil.copy(gt / "crate" / P.GT_MESH, pred / "crate.glb")  # PRED/<id>.glb
    shutil.copy(gt / "mug" / P.GT_MESH, pred / "mug" / "mesh.glb")  # PRED/<id>/mesh.glb (fusion output)
    summary = evaluate(pred, gt, tmp_path / "out")
    assert [(o.object_id, o.status) for o in summary.objects] == [("crate", OK), ("mug", OK)]
    for o in summary.objects:
        assert o.chamfer.chamfer == 0.0 and o.chamfer.fscore == 1.0 and o.iou.iou == 1.0
        assert o.appearance.psnr > 40 and o.appearance.ssim > 0.99  # only 8-bit PNG rounding differs
        assert o.appearance.num_views == 4 and o.appearance.image_size == (64, 64)
    assert [o.pred_colour for o in summary.objects] == ["texture", "vertex"]
    assert summary.aggregate("mean")["volume_iou"] == 1.0


def test_translated_and_scaled_prediction_is_undone_by_unit_box_only(gt: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in OBJECTS:
        mesh = gt_mesh(gt, name)
        mesh.apply_scale(1.7)
        mesh.apply_translation([0.3, -0.2, 0.1])
        mesh_io.save_mesh(mesh, pred / f"{name}.glb")
    strict = evaluate(pred, gt)  # the default protocol (keep) counts scale and placement errors
    for o in strict.objects:
        assert o.alignment.mode == "keep" and o.alignment.pred_transform.scale == 1.0
        assert o.chamfer.chamfer > 0.1 and o.iou.iou < 0.5, o.object_id
    moved = evaluate(pred, gt, normalization="unit_box")
    for o in moved.objects:
        assert o.chamfer.chamfer < 1e-4 and o.iou.iou > 0.99 and o.appearance.psnr > 35, o.object_id
        assert o.alignment.mode == "unit_box"
        assert o.alignment.pred_transform.scale == pytest.approx(1 / 1.7, rel=1e-5)
    kept = evaluate(pred, gt, normalization="keep")  # the same files without normalisation: far off
    for o in kept.objects:
        assert o.chamfer.chamfer > 0.1 and o.iou.iou < 0.5 and o.appearance.psnr < 20


def test_input_view_frame_and_icp(gt: Path, tmp_path: Path) -> None:
    cams = Cameras.load(gt / "mug" / "cameras.json")  # elevation 20°: the input camera is tilted
    R0 = cams.c2w[0, :3, :3].double().numpy()
    pred = tmp_path / "pred"
    pred.mkdir()
    mesh = gt_mesh(gt, "mug")
    mesh.vertices = np.asarray(mesh.vertices) @ R0  # world -> input camera axes (v_cam = R0^T v)
    # input_view reads a file's coordinates as stored: undo save_mesh's Z-up -> Y-up turn
    mesh_io.save_mesh(mesh.apply_transform(mesh_io.Y_UP_TO_Z_UP), pred / "mug.glb")
    in_view = evaluate(pred, gt, normalization="input_view").objects[1]
    as_world = evaluate(pred, gt, normalization="unit_box").objects[1]
    assert in_view.status == OK and in_view.chamfer.chamfer < 1e-3 and in_view.iou.iou > 0.98
    assert as_world.chamfer.chamfer > 10 * in_view.chamfer.chamfer + 0.01

    # A 4° pose error: ICP removes it, and the record says so. (The crate: point-to-point ICP
    # needs many more iterations to turn the mug, a near-cylinder, about its axis.)
    small = gt_mesh(gt, "crate")
    small.apply_transform(trimesh.transformations.rotation_matrix(math.radians(4), [0, 0, 1]))
    mesh_io.save_mesh(small, pred / "crate.glb")
    plain = evaluate(pred, gt, normalization="keep").objects[0]
    icp = evaluate(pred, gt, normalization="keep", icp=True).objects[0]
    assert icp.alignment.icp is not None and plain.alignment.icp is None
    assert icp.chamfer.chamfer < 0.3 * plain.chamfer.chamfer
    assert icp.alignment.icp.rmse_after < icp.alignment.icp.rmse_before


def test_missing_corrupt_and_extra_predictions_are_listed_everywhere(gt: Path, tmp_path: Path) -> None:
    pred, out = tmp_path / "pred", tmp_path / "out"
    pred.mkdir()
    (pred / "crate.glb").write_bytes(b"glTF this is not")  # corrupt; mug has no file at all
    shutil.copy(gt / "mug" / P.GT_MESH, pred / "stranger.glb")  # no GT object of that name
    summary = evaluate(pred, gt, out)
    crate, mug = summary.objects
    assert crate.status == BROKEN and "cannot read crate.glb" in crate.reason
    assert mug.status == MISSING and "mug.{glb,obj,ply}" in mug.reason
    assert summary.evaluated == [] and summary.unmatched_predictions == ["stranger.glb"]

    rows = list(csv.DictReader((out / "per_object.csv").open()))
    assert [(r["object_id"], r["status"]) for r in rows] == [("crate", BROKEN), ("mug", MISSING)]
    assert all(r["reason"] and r["chamfer"] == "" for r in rows)
    data = json.loads((out / "summary.json").read_text())
    assert data["counts"] == {"objects": 2, "ok": 0, "missing": 1, "broken": 1}
    assert {d["object_id"]: d["status"] for d in data["not_evaluated"]} == {"crate": BROKEN, "mug": MISSING}
    assert data["mean"]["chamfer"] is None and data["unmatched_predictions"] == ["stranger.glb"]
    md = (out / "summary.md").read_text()
    assert "broken: ValueError: cannot read crate.glb" in md and "| mug |" in md and "stranger.glb" in md


def test_degenerate_prediction_is_broken_not_a_crash(gt: Path, tmp_path: Path) -> None:
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]])  # zero area
    flat.export(tmp_path / "mug.ply")
    result = P.evaluate_object(tmp_path / "mug.ply", gt / "mug", SMALL)
    assert result.status == BROKEN and result.reason
    assert P.evaluate_object(None, gt / "mug", SMALL).status == MISSING


def test_result_files_record_protocol_choices_and_versions(gt: Path, tmp_path: Path) -> None:
    pred, out = tmp_path / "pred", tmp_path / "out"
    pred.mkdir()
    shutil.copy(gt / "mug" / P.GT_MESH, pred / "mug.glb")
    evaluate(pred, gt, out, icp=True)
    data = json.loads((out / "summary.json").read_text())
    p = data["protocol"]
    assert p["name"] == "nova3d" and p["normalization"] == "keep" and p["icp"] is True
    assert p["requested_as"] == "nova3d" and p["alias_of"] is None and p["iou_inside"] == "vote6"
    assert p["fscore_threshold"] == 0.05 and p["iou_resolution"] == 64 and p["chamfer_points"] == 5_000
    assert data["protocol_overrides"] == {"icp": True, "num_views": 4, "image_size": 64, "chamfer_points": 5_000}
    assert set(data["versions"]) >= {"nova3d", "torch", "trimesh", "torchmetrics"}
    assert data["lpips"]["status"] in ("computed", "unavailable")
    if data["lpips"]["status"] == "unavailable":  # never a made-up number
        assert data["lpips"]["reason"] and data["mean"]["lpips"] is None
    mug = next(o for o in data["objects"] if o["object_id"] == "mug")
    assert mug["alignment"]["mode"] == "keep" and mug["alignment"]["icp"]["iterations"] >= 1
    row = next(r for r in csv.DictReader((out / "per_object.csv").open()) if r["object_id"] == "mug")
    assert row["normalization"] == "keep" and row["icp"] == "True" and row["appearance_source"] == "mesh_renders"
    assert "ICP on" in (out / "summary.md").read_text()


def test_ground_truth_problems_are_one_line_errors(gt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "gt"
    shutil.copytree(gt / "mug", bad / "mug")
    (bad / "mug" / P.GT_MESH).unlink()
    with pytest.raises(Nova3DError, match=r"mug/mesh.glb is missing"):
        P.evaluate_set(tmp_path, bad, SMALL, progress=False)
    with pytest.raises(Nova3DError, match=r"cameras.json: 4 views, protocol nova3d evaluates 16"):
        P.evaluate_set(tmp_path, gt, "gso", progress=False)  # the alias
    with pytest.raises(Nova3DError, match=r"views at elevation 20..20°, FOV 49.10°; protocol syncdreamer needs 30°"):
        P.evaluate_set(tmp_path, gt, P.get_protocol("syncdreamer", num_views=4), progress=False, views_dir=tmp_path)
    with pytest.raises(Nova3DError, match=r"protocol syncdreamer scores PSNR/SSIM/LPIPS on the generated views: give --views"):
        P.evaluate_set(tmp_path, gt, "syncdreamer", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Nova3DError, match="no object folders"):
        P.gt_objects(tmp_path / "empty")


def test_cli_exit_codes(gt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(P.PROTOCOLS, "nova3d", SMALL)  # the CLI's default protocol, at test size
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copy(gt / "mug" / P.GT_MESH, pred / "mug.glb")
    args = ["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main(args + ["--normalization", "keep"]) == 0  # one of two evaluated is enough
    printed = capsys.readouterr().out
    assert "| mug |" in printed and "missing" in printed and "Normalisation `keep`" in printed
    good = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    (pred / "mug.glb").unlink()
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("nova3d eval: error: no object could be evaluated: crate (missing), mug (missing); "
                          "the earlier result in")
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == good  # a failed eval loses nothing
    assert cli.main(args + ["--protocol", "nope"]) == 2
    assert capsys.readouterr().err.strip() == ("nova3d eval: error: unknown protocol 'nope'; "
                                               "known: nova3d, syncdreamer, eschernet, aligned, gso")
    assert cli.main(["eval", "--list-protocols"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("nova3d", "syncdreamer", "eschernet", "aligned", "gso          alias of nova3d"))
    assert "eval_mesh.py" in listed and "eval_3D_GSO.py" in listed
    assert cli.main(["eval", "--pred", str(pred)]) == 2
    assert capsys.readouterr().err.strip() == "nova3d eval: error: --gt, --out required (or --list-protocols)"
    assert cli.main(["eval", "--pred", str(pred), "--gt", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "ground-truth folder not found" in capsys.readouterr().err


def test_undo_inverts_a_similarity() -> None:
    from nova3d.eval.normalize import Similarity

    rot = torch.tensor(trimesh.transformations.rotation_matrix(0.7, [1, 2, 3])[:3, :3])
    tf = Similarity(2.5, rot, torch.tensor([0.1, -0.4, 0.3], dtype=torch.float64))
    pts = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(P._undo(tf, tf.apply(pts)), pts, atol=1e-5)


def test_syncdreamer_protocol_scores_the_generated_views(tmp_path: Path) -> None:
    """appearance="generated_views": the views a method generated, not re-renders of its mesh, are
    compared with the GT views (SyncDreamer eval_nvs.py); both layouts are read, mismatches named."""
    from nova3d.eval.protocols import SYNCDREAMER_FOV_DEG

    gt = tmp_path / "gt"
    for name in OBJECTS:
        write_gt_object(gt, name, make_object(name), views=4, res=64, elevation_deg=30.0, fov_deg=SYNCDREAMER_FOV_DEG)
    pred, views = tmp_path / "pred", tmp_path / "views"
    pred.mkdir()
    for name in OBJECTS:
        shutil.copy(gt / name / P.GT_MESH, pred / f"{name}.glb")
    (views / "crate").mkdir(parents=True)  # SyncDreamer's layout: 000.png ... directly in the folder
    for png in sorted((gt / "crate" / "rgb").iterdir()):
        shutil.copy(png, views / "crate" / png.name)
    shutil.copytree(gt / "mug", views / "mug")  # an object folder whose cameras sit elsewhere
    cams = Cameras.load(views / "mug" / "cameras.json")
    cams.elevation_deg = cams.elevation_deg * 0
    cams.save(views / "mug" / "cameras.json")
    proto = P.get_protocol("syncdreamer", num_views=4, image_size=64, lpips=False)
    summary = P.evaluate_set(pred, gt, proto, tmp_path / "out", progress=False, views_dir=views)
    crate, mug = summary.objects
    assert crate.status == mug.status == OK and crate.appearance_source == "generated_views"
    assert crate.appearance.psnr == 100.0 and crate.appearance.ssim == pytest.approx(1.0, abs=1e-6)
    assert crate.appearance.ssim_variant == "torchmetrics_2023" and crate.chamfer.sampling == "depth"
    assert crate.chamfer.chamfer == 0.0 and crate.iou.iou == 1.0 and crate.iou.grid == "mesh2sdf"
    assert mug.appearance is None and "elevation_deg" in mug.appearance_reason
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert data["protocol"]["name"] == "syncdreamer" and data["views_dir"] == str(views)
    assert any("no appearance metrics for mug" in w for w in data["warnings"])
    assert any("PSNR cap" in w for w in data["warnings"]) and data["mean"]["psnr"] == 100.0
    row = next(r for r in csv.DictReader((tmp_path / "out" / "per_object.csv").open()) if r["object_id"] == "mug")
    assert row["appearance_source"] == "generated_views" and "elevation_deg" in row["appearance_reason"]
