"""`make demo` (nova3d/demo.py, nova3d/demo_report.py) on a tiny scale: the pipeline after the
Blender render on a ray-traced ellipsoid with tiny fusion, the report's links and rows, and the
AUROC it reports on known values."""
import re

import numpy as np
import pytest
import torch
import trimesh

from helpers_objects import RADII, make_object_folder
from nova3d.demo import RUNS, run_demo
from nova3d.eval.conflict import auroc, conflict_auroc
from nova3d.eval.protocol import get_protocol
from nova3d.fusion.perturb import PerturbConfig
from nova3d.mesh_io import save_mesh

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ("optim.steps=30", "optim.rays=256", "optim.warmup_steps=2", "optim.pose_start_step=10",
        "loss.conflict_start_step=10", "field.hashgrid.levels=4", "field.hashgrid.log2_table_size=12",
        "field.hashgrid.max_resolution=64", "render.num_steps=64", "render.occupancy.resolution=16",
        "export.resolution=32", "logging.tensorboard=false", "logging.progress=false", "logging.turntable_frames=2")


# ---------------------------------------------------------------- auroc

def test_auroc_known_values():
    labels = np.array([0, 0, 1, 1], bool)
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0  # perfect
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0  # reversed
    assert auroc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # all tied
    assert auroc([0.1, 0.5, 0.5, 0.9], labels) == pytest.approx(0.875)  # one tie between classes counts half
    assert np.isnan(auroc([0.1, 0.2], [True, True]))  # one class only
    rng = np.random.default_rng(0)  # a random score is near chance; AUROC(-s) = 1 - AUROC(s)
    s, y = rng.normal(size=4000), rng.random(4000) < 0.3
    assert abs(auroc(s, y) - 0.5) < 0.05 and auroc(-s, y) == pytest.approx(1 - auroc(s, y))


def test_conflict_auroc_counts_object_pixels_of_non_input_views_only():
    corrupted = np.zeros((3, 4, 4), bool)
    corrupted[1, :2] = True  # top half of view 1 corrupted
    obj = np.ones((3, 4, 4), np.uint8) * 255
    conflict = torch.zeros(3, 2, 2)
    conflict[1, 0] = 1.0  # 2x2 maps: nearest-upsampled to 4x4, the top row covers the top half
    conflict[0] = 1.0  # the input view's map would ruin the score if it counted
    assert conflict_auroc(conflict, corrupted, obj, input_view=0) == 1.0
    obj[2] = 0  # background pixels do not count either: view 1 alone, still perfect
    conflict[2] = 1.0
    assert conflict_auroc(conflict, corrupted, obj, input_view=0) == 1.0


# ---------------------------------------------------------------- the pipeline

def _gt_folder(root):
    folder = make_object_folder(root / "gt", "ellipsoid", views=8, res=32, with_depth=True)
    mesh = trimesh.creation.icosphere(subdivisions=4)
    mesh.vertices = mesh.vertices * np.asarray(RADII)
    save_mesh(mesh, folder / "mesh.glb")
    return folder


def test_demo_pipeline_writes_a_report_with_every_run(tmp_path):
    gt = _gt_folder(tmp_path)
    protocol = get_protocol("gso", num_views=None, image_size=32, chamfer_points=4000, iou_resolution=32,
                            lpips=False)
    perturb = PerturbConfig(color_views=[2, 5], kinds=["drift", "blotch"], pose_rotation_deg=3.0,
                            pose_translation=0.01)
    out = tmp_path / "demo"
    demo = run_demo(gt, out, TINY, perturb, protocol=protocol)

    report = (out / "report.md").read_text()
    assert demo.report == out / "report.md" and (out / "demo.json").is_file()
    # every link in the report points at a file that exists
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert len(links) >= 3 * 5 + 3 - 1  # no_conflict has no conflict-maps link
    for link in links:
        assert (out / link).is_file(), link
    # one table row per run, with numbers in it (the ellipsoid is scored, not skipped)
    for name, experiment in RUNS.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} (`{experiment}`)"))
        assert re.search(r"\| \d+\.\d{4} \|", row), row
        assert (out / "fusion" / name / "ellipsoid" / "eval" / "summary.json").is_file()
    assert "Against `no_conflict`" in report and "Against `no_pose_refine`" in report
    assert "nova3d image-to-3d --image IMG --model" in report
    # the conflict AUROC is a probability for runs with conflict maps, absent without
    assert 0 <= demo.runs["default"].conflict_auroc <= 1 and demo.runs["no_conflict"].conflict_auroc is None
    # an ablation without conflict maps writes none (nor a contact sheet of zeros)
    assert (demo.runs["default"].out_dir / "conflict_maps.png").is_file()
    assert not (demo.runs["no_conflict"].out_dir / "conflict_maps.png").exists()
    # pose errors before/after came from the perturbed folder's true cameras
    m = demo.runs["no_pose_refine"].metrics
    assert m["rotation_error_deg_before"] > 0 and m["rotation_error_deg_after"] == pytest.approx(
        m["rotation_error_deg_before"])


@pytest.mark.slow
def test_demo_chain_from_one_image_writes_a_report_and_reruns(tmp_path, monkeypatch):
    """make demo's main section: toy object render -> shipped toy pipeline -> fuse x3 -> eval -> report,
    twice into the same folder (the second run redoes everything after the kept render). The first run
    fuses once (a cheaper chain: this test is among the suite's longest); the second replaces it whole."""
    from nova3d.demo import QUICK_TOY_FUSION
    from nova3d.demo_chain import REFERENCE, RUNS as CHAIN_RUNS, run_chain

    out = tmp_path / "demo"
    first = run_chain(out, fusion=QUICK_TOY_FUSION + ("logging.turntable_frames=2",), steps=4, runs=("default",),
                      reference=False)
    assert set(first.runs) == {"default"} and (out / "report.md").is_file()
    chain = run_chain(out, fusion=QUICK_TOY_FUSION + ("logging.turntable_frames=2",), steps=4)
    report = (out / "report.md").read_text()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("nova3d.fuse.fuse_object", killed)
    with pytest.raises(KeyboardInterrupt):  # killed after generating: the earlier results stay as they were
        run_chain(out, fusion=QUICK_TOY_FUSION + ("logging.turntable_frames=2",), steps=4)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    for link in re.findall(r"\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    assert (out / "generated" / chain.object_id / "rgb" / "015.png").is_file()
    assert set(chain.runs) == {*CHAIN_RUNS, REFERENCE} and (out / "generated_vs_true.png").is_file()
    assert "on the **true** renders" in report
    for name in CHAIN_RUNS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} (`"))
        assert re.search(r"\| \d+\.\d{4} \|", row), row  # a Chamfer distance was measured
    g, b = chain.view_scores, chain.baseline_scores
    assert 0 < g["psnr"] < 100 and 0 <= g["normal_error_deg"] <= 180 and 0 <= g["mask_iou"] <= 1
    assert b["psnr"] > 0 and "input view repeated" in report
