"""The pose-sensitivity study (nova3d/eval/pose_study.py, nova3d/eval/plot.py): its files, and
(slow tier) that pose refinement leaves less pose error than none at the largest perturbation,
on a ray-traced ellipsoid with tiny fusion (no Blender)."""
import json

import numpy as np
import pytest
import trimesh
from PIL import Image

from helpers_objects import RADII, make_object_folder
from nova3d.errors import Nova3DError
from nova3d.eval.plot import Panel, line_panels, nice_ticks
from nova3d.eval.pose_study import MODES, check_angles, run_pose_study
from nova3d.eval.protocol import get_protocol
from nova3d.mesh_io import save_mesh

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["optim.steps=80", "optim.rays=384", "optim.warmup_steps=2", "optim.pose_start_step=15",
        "loss.conflict_start_step=30", "field.hashgrid.levels=6", "field.hashgrid.log2_table_size=13",
        "field.hashgrid.max_resolution=96", "render.num_steps=64", "render.occupancy.resolution=16",
        "export.resolution=48", "logging.tensorboard=false", "logging.progress=false", "logging.turntable_frames=2"]


def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(0, 15) == [0, 5, 10, 15]
    ticks = nice_ticks(0.0123, 0.0456)
    assert ticks[0] <= 0.0123 and ticks[-1] >= 0.0456 and 3 <= len(ticks) <= 7
    assert len(set(np.round(np.diff(ticks), 12))) == 1
    assert nice_ticks(2.0, 2.0)[0] < 2.0 < nice_ticks(2.0, 2.0)[-1]  # a flat curve still gets an axis


def test_line_panels_draws_each_curve(tmp_path):
    panel = Panel("t", "x", "y", {"a": ([0, 1, 2], [0.0, 1.0, 2.0]), "b": ([0, 1, 2], [2.0, 1.0, None])}, [0, 1, 2])
    path = line_panels([panel, panel], "title", tmp_path / "p.png", panel_size=(300, 240))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (240 + 28, 600, 3)
    for colour in ((31, 119, 180), (255, 127, 14)):  # both series' colours appear
        assert (np.abs(image.astype(int) - colour).sum(-1) < 10).sum() > 50


def test_angles_are_checked():
    assert check_angles([10, 0, 5]) == [0, 5, 10]
    for bad in ([], [-1], [200], [5, 5]):
        with pytest.raises(Nova3DError):
            check_angles(bad)


@pytest.mark.slow
def test_pose_study_files_and_refinement_beats_none_at_the_largest_angle(tmp_path):
    gt = make_object_folder(tmp_path / "gt", "ellipsoid", views=8, res=32)
    mesh = trimesh.creation.icosphere(subdivisions=4)
    mesh.vertices = mesh.vertices * np.asarray(RADII)
    save_mesh(mesh, gt / "mesh.glb")
    protocol = get_protocol("gso", num_views=None, image_size=32, chamfer_points=4000, iou_resolution=32, lpips=False)
    angles = [0, 10]
    study = run_pose_study(gt, tmp_path / "study", angles, TINY, protocol=protocol, progress=False)

    for path in (study.json_path, study.png_path, study.md_path):
        assert path.is_file(), path
    with Image.open(study.png_path) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 200
    data = json.loads(study.json_path.read_text())
    pairs = {(e["angle_deg"], e["mode"]) for e in data["entries"]}
    assert len(data["entries"]) == len(angles) * len(MODES) and pairs == {(a, m) for a in angles for m in MODES}
    assert all(e["status"] == "ok" and e["chamfer"] is not None for e in data["entries"])
    by = {(e["angle_deg"], e["mode"]): e for e in data["entries"]}
    # the applied perturbation is exactly the angle (pose_magnitude "max"), and unrefined cameras keep it
    assert by[(10, "no_refine")]["rotation_error_deg_before"] == pytest.approx(10, abs=1e-3)
    assert by[(10, "no_refine")]["rotation_error_deg_after"] == pytest.approx(10, abs=1e-3)
    assert by[(0, "refine")]["rotation_error_deg_before"] == pytest.approx(0, abs=1e-3)
    assert by[(10, "refine")]["rotation_error_deg_after"] < by[(10, "no_refine")]["rotation_error_deg_after"]
    assert "| 10° | refine" in study.md_path.read_text()
