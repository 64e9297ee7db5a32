"""De-conflict fusion end to end (nova3d.fuse, nova3d.systems.fusion, nova3d.losses.fusion):
input checks before any optimisation, the loss contracts, NaN handling, and (slow tier) a
reduced version of bench/fusion_quality.py on a ray-traced ellipsoid with known geometry."""
import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from helpers_objects import RADII, make_object_folder, synthetic_views
from nova3d.cli import main as cli_main
from nova3d.eval.appearance import psnr_per_view
from nova3d.eval.mesh_render import render_mesh
from nova3d.fuse import fuse_object, load_fusion_config
from nova3d.fusion.views import FusionInputError, RaySampler, load_views
from nova3d.losses import fusion as L
from nova3d.systems.fusion import FusionDiverged

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["optim.rays=256", "optim.warmup_steps=2", "field.hashgrid.levels=4", "field.hashgrid.log2_table_size=12",
        "field.hashgrid.max_resolution=64", "render.num_steps=64", "render.occupancy.resolution=16",
        "export.resolution=32", "logging.tensorboard=false", "logging.progress=false", "logging.turntable_frames=2"]
# Huge but finite learning rates: the loss leaves the floats within a few steps (an infinite one
# is refused when the config loads, test_numbers_are_checked_when_the_config_loads).
DIVERGE = ["optim.steps=5", "optim.lr_grid=1e12", "optim.lr_net=1e12", "optim.lr_color=1e12", "optim.warmup_steps=0"]


@pytest.fixture()
def folder(tmp_path):
    return make_object_folder(tmp_path, "ellipsoid", views=4, res=24)


# ---------------------------------------------------------------- inputs

def test_views_load_in_world_frame_on_white(tmp_path):
    folder = make_object_folder(tmp_path, "e", views=4, res=24)
    views, gt = load_views(folder), synthetic_views(4, 24)
    mask = torch.from_numpy(gt.mask)
    assert torch.equal(views.mask.bool(), mask)
    # 16-bit normals come back within quantisation, in the world frame the renderer used
    world = torch.from_numpy(gt.normals_world).permute(0, 3, 1, 2)
    assert (views.normal - world).abs()[:, :, mask[0].bool().expand(4, -1, -1)[0]].max() < 1e-3
    assert torch.all(views.rgb.permute(0, 2, 3, 1)[~mask] == 1.0)  # background composited on white
    rays = RaySampler(views, object_fraction=1.0, dilate=0).sample(500, torch.Generator().manual_seed(0))
    assert rays.pix.shape == (500, 2) and rays.rgb.shape == (500, 3) and torch.all(rays.mask == 1)
    # the colour a ray carries is its pixel's
    col, row = rays.pix.long().unbind(-1)
    assert torch.equal(rays.rgb, views.rgb[rays.view, :, row, col])


def _drop_view(f):
    (f / "rgb" / "002.png").unlink()


def _drop_cameras(f):
    (f / "cameras.json").unlink()


def _empty_mask(f):
    Image.new("L", (24, 24), 0).save(f / "mask" / "001.png")


def _wrong_size(f):
    Image.new("RGBA", (20, 20)).save(f / "rgb" / "003.png")


def _nan_camera(f):
    cams = json.loads((f / "cameras.json").read_text())
    cams["frames"][1]["c2w"][0][3] = "NaN"
    (f / "cameras.json").write_text(json.dumps(cams).replace('"NaN"', "NaN"))


@pytest.mark.parametrize("breakage,match", [(_drop_view, "rgb/002.png"), (_drop_cameras, "cameras.json"),
                                            (_empty_mask, "empty masks"), (_wrong_size, "sizes"),
                                            (_nan_camera, "NaN")])
def test_bad_input_fails_before_optimising_with_one_line(folder, tmp_path, capsys, breakage, match):
    breakage(folder)
    with pytest.raises(FusionInputError, match=match):
        load_views(folder)
    out = tmp_path / "out"
    assert cli_main(["fuse", "--views", str(folder), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nova3d fuse: error:") and str(folder) in err[0]
    assert not out.exists() or not list(out.glob("mesh.*"))


def test_nan_stops_the_run_and_writes_no_mesh(folder, tmp_path):
    cfg = load_fusion_config("fusion/default", TINY + DIVERGE)
    with pytest.raises(FusionDiverged, match="non-finite loss at step"):
        fuse_object(folder, tmp_path / "out", cfg)
    assert not list((tmp_path / "out").glob("mesh.*")) and not (tmp_path / "out" / "metrics.json").exists()


def test_a_failed_fuse_leaves_the_earlier_result_as_it_was(folder, tmp_path, capfd):
    """issue 16: a diverging rerun into a good result's folder used to rewrite its config.yaml."""
    out = tmp_path / "out"
    assert cli_main(["fuse", "--views", str(folder), "--out", str(out), *TINY, "optim.steps=3",
                     "logging.progress=true"]) == 0
    captured = capfd.readouterr()
    err = captured.err.replace("\r", "\n")
    noise = [line for line in err.splitlines() if any(w in line for w in (
        "Warning", "warn(", "Tip:", "TPU", "GPU", "site-packages", "litlogger", "Training:", "Epoch "))]
    assert not noise, noise  # no third-party noise on a fuse run's console: our bar and lines only
    assert not [line for line in err.splitlines() if line.strip() and "|" not in line], err  # bars only
    out_bars = {line.split(":")[0] for line in captured.out.replace("\r", "\n").splitlines() if "|" in line}
    assert out_bars == {"fuse"}, out_bars  # one step bar (no "Training: 0/?", no per-epoch bars)
    assert "fusion: full budget for 24² views" in captured.out  # which budget, said in the output
    good = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli_main(["fuse", "--views", str(folder), "--out", str(out), *TINY, *DIVERGE]) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == good
    assert not list(tmp_path.glob("*.partial"))


def test_fusion_budget_follows_the_views_resolution():
    """issue 25: 64² views (the toy model's) got the 256² budget of 600 steps; now `auto` picks the
    small budget for small views unless a budget key was set, and says so."""
    from nova3d.fusion.config import SMALL_VIEWS, describe_budget, fit_budget

    default = load_fusion_config("fusion/default")
    small = fit_budget(default, 64)
    assert (small.optim.budget, small.optim.steps, small.optim.fit_resolution) == ("small", 240, 64)
    assert small.field.hashgrid.levels == 8 and small.optim.pose_start_step == 40
    assert fit_budget(small, 64) == small  # resolving twice changes nothing
    assert fit_budget(default, 32).optim.fit_resolution == 32  # never above the views' size
    full = fit_budget(default, 256)
    assert (full.optim.budget, full.optim.steps, full.optim.fit_resolution) == ("full", 600, None)
    assert fit_budget(default, SMALL_VIEWS + 1).optim.budget == "full"
    mine = fit_budget(load_fusion_config("fusion/default", ["optim.steps=30"]), 64)  # a budget key set: kept
    assert (mine.optim.budget, mine.optim.steps, mine.field.hashgrid.levels) == ("full", 30, 10)
    forced = fit_budget(load_fusion_config("fusion/default", ["optim.budget=full"]), 64)
    assert forced.optim.steps == 600
    forced = fit_budget(load_fusion_config("fusion/default", ["optim.budget=small", "optim.rays=64"]), 256)
    assert (forced.optim.steps, forced.optim.rays) == (240, 64)
    assert "small budget for 64² views (240 steps" in describe_budget(small, 64)


def test_wrong_experiment_kind_is_refused():
    with pytest.raises(Exception, match="not a fusion experiment"):
        load_fusion_config("tiny")


@pytest.mark.parametrize("override", ["field.color_view_mode=per_view", "loss.color_metric=l2",
                                      "export.color_source=fields"])
def test_misspelt_choice_is_refused_at_load(override):
    with pytest.raises(Exception, match=override.split("=")[0]):
        load_fusion_config("fusion/default", [override])


def test_color_metrics_known_values():
    pred, target = torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[0.2, 0.5, 0.8]])
    assert L.color_error(pred, target, "l1") == pytest.approx(0.2)
    assert L.color_error(pred, target, "mse") == pytest.approx(0.06)


# ---------------------------------------------------------------- losses

def test_conflict_optimum_is_error_over_lambda():
    """Per ray, (1 - c) e + lambda c^2 / 2 is smallest at c = min(1, e / lambda)."""
    err = torch.tensor([0.01, 0.05, 0.3])
    lam = 0.1
    trusted = torch.tensor([False, False, False])
    c = torch.full((3,), 0.5, requires_grad=True)
    opt = torch.optim.SGD([c], lr=20.0)
    for _ in range(500):
        opt.zero_grad()
        (L.conflict_weighted_color(err, c) + lam * L.conflict_regulariser(c, trusted)).backward()
        opt.step()
        with torch.no_grad():
            c.clamp_(0, 1)
    assert torch.allclose(c.detach(), torch.tensor([0.1, 0.5, 1.0]), atol=1e-3)
    # "everything conflicts" is not free: c = 1 everywhere costs lambda / 2 per ray
    ones = torch.ones(3)
    assert L.conflict_weighted_color(err, ones) + lam * L.conflict_regulariser(ones, trusted) == pytest.approx(lam / 2)
    # trusted rays do not count in the regulariser
    assert L.conflict_regulariser(torch.tensor([0.0, 1.0]), torch.tensor([False, True])) == 0.0


def test_geometry_losses_known_values():
    assert L.eikonal_loss(torch.tensor([[0.0, 3.0, 4.0]])) == pytest.approx(16.0)
    assert L.sparsity_loss(torch.zeros(5)) == pytest.approx(1.0)
    assert L.normal_loss(torch.tensor([[0.0, 0, 2]]), torch.tensor([[0.0, 0, 1]]), torch.ones(1)) == pytest.approx(0.0)
    assert L.normal_loss(torch.tensor([[0.0, 0, 1]]), torch.tensor([[0.0, 0, -1]]), torch.ones(1)) == pytest.approx(2.0)
    assert L.mask_loss(torch.tensor([0.5]), torch.tensor([1.0])) == pytest.approx(np.log(2), rel=1e-4)


# ---------------------------------------------------------------- a reduced quality run

def _ellipsoid_mesh() -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=5)
    mesh.vertices = mesh.vertices * np.asarray(RADII)
    return mesh


@pytest.mark.slow
def test_fusion_recovers_the_ellipsoid_and_flags_corrupted_views(tmp_path):
    from nova3d.eval.conflict import conflict_auroc
    from nova3d.eval.geometry import chamfer_surface, volume_iou
    from nova3d.fusion.perturb import PerturbConfig, load_corruption_masks, perturb_object

    src = make_object_folder(tmp_path / "src", "ellipsoid", views=8, res=48)
    perturb_object(src, tmp_path / "perturbed" / "ellipsoid",
                   PerturbConfig(color_views=[2, 5], kinds=["drift", "blotch"], seed=1))
    folder = tmp_path / "perturbed" / "ellipsoid"
    cfg = load_fusion_config("fusion/default", [
        "optim.steps=150", "optim.rays=512", "optim.pose_start_step=60", "loss.conflict_start_step=60",
        "field.hashgrid.levels=8", "field.hashgrid.log2_table_size=15", "field.hashgrid.max_resolution=128",
        "render.num_steps=128", "render.occupancy.resolution=32", "export.resolution=96",
        "logging.progress=false", "logging.turntable_frames=4", "logging.preview_every_n_steps=75"])
    result = fuse_object(folder, tmp_path / "out", cfg)
    out = tmp_path / "out"
    for name in ("mesh.glb", "mesh.obj", "mesh.ply", "turntable.gif", "errors.png", "conflict_maps.png",
                 "conflict_maps.npz", "cameras_refined.json", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experiment"] == "fusion/default" and metrics["faces"] > 100

    pred = trimesh.load(out / "mesh.ply", force="mesh")
    assert chamfer_surface(pred, _ellipsoid_mesh(), num_points=20_000).chamfer < 0.02
    assert volume_iou(pred, _ellipsoid_mesh()).iou > 0.8
    # The conflict map ranks corrupted object pixels above clean ones (chance = 0.5).
    auc = conflict_auroc(result.conflict, load_corruption_masks(folder), schema_masks(folder), input_view=0)
    assert auc > 0.7  # 0.83 measured
    # The texture (projected from the views, the corrupted pixels weighted down) reproduces the
    # CLEAN views at their cameras.
    clean = load_views(src)
    rendered = render_mesh(pred, clean.cameras, image_size=clean.resolution).rgb.clamp(0, 1)
    assert psnr_per_view(rendered, clean.rgb).mean() > 26  # 29.2 measured; 23.3 with export.color_source=field


def schema_masks(folder) -> np.ndarray:
    from nova3d.data.shards import read_object_folder

    return read_object_folder(folder).mask


def test_a_saved_field_exports_again_without_a_fit(folder, tmp_path, capsys):
    """export.save_field + --from-field: the same export settings give the same mesh, other ones
    another mesh, and a field fitted with other field settings is refused in one line."""
    fitted = tmp_path / "fit"
    tiny = [*TINY, "optim.steps=5"]
    assert cli_main(["fuse", "--views", str(folder), "--out", str(fitted), *tiny, "export.save_field=true"]) == 0
    field_pt = fitted / "field.pt"
    assert field_pt.is_file()
    same, finer = tmp_path / "same", tmp_path / "finer"
    assert cli_main(["fuse", "--views", str(folder), "--out", str(same), "--from-field", str(field_pt), *tiny]) == 0
    a, b = (trimesh.load(d / "mesh.ply", force="mesh") for d in (fitted, same))
    assert np.array_equal(a.faces, b.faces) and np.allclose(a.vertices, b.vertices)
    metrics = json.loads((same / "metrics.json").read_text())
    assert metrics["from_field"] == str(field_pt.resolve()) and metrics["seconds_fit"] < 30
    resolution = next(int(o.split("=")[1]) for o in tiny if o.startswith("export.resolution="))
    assert cli_main(["fuse", "--views", str(folder), "--out", str(finer), "--from-field", str(field_pt), *tiny,
                     f"export.resolution={2 * resolution}"]) == 0
    assert len(trimesh.load(finer / "mesh.ply", force="mesh").faces) > 2 * len(a.faces)
    other = [o for o in tiny if not o.startswith("field.hashgrid.levels=")] + ["field.hashgrid.levels=5"]
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert cli_main(["fuse", "--views", str(folder), "--out", str(bad), "--from-field", str(field_pt), *other]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "field.pt: was fitted with other field" in err and not bad.exists()
