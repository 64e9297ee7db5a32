"""Simulated generation errors (nova3d.fusion.perturb) and the object-folder writer
(nova3d.data.object_folder) on a tiny synthetic object (8 views at 32²). Runs in seconds."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.data.object_folder import write_object_sample
from nova3d.data.shards import ObjectSample, read_object_folder
from nova3d.errors import Nova3DError
from nova3d.fusion.perturb import (PerturbConfig, PerturbRecord, gaussian_blur, load_corruption_masks,
                                   perturb_object)
from nova3d.fusion.poses import pose_error
from helpers_objects import synthetic_views

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V, RES = 8, 32
CFG = PerturbConfig(color_views=[1, 3, 5, 6], blur_sigma=0.06, pose_rotation_deg=5.0, pose_translation=0.02, seed=3)
UNTOUCHED = [0, 2, 4, 7]


def synthetic_sample(with_depth: bool = False) -> ObjectSample:
    gt = synthetic_views(V, RES)
    alpha = gt.mask.astype(np.uint8) * 255
    rgba = np.concatenate([np.round(gt.rgb * 255).astype(np.uint8), alpha[..., None]], -1).transpose(0, 3, 1, 2)
    normal = np.round((gt.normals_stored + 1) / 2 * 65535).astype(np.uint16).transpose(0, 3, 1, 2)
    depth = np.round(gt.depth * schema.DEPTH_SCALE).astype(np.uint16) if with_depth else None
    meta = dict(object_id="ellipsoid", source="procedural:test", num_views=V, resolution=RES, has_depth=with_depth)
    return ObjectSample("ellipsoid", np.ascontiguousarray(rgba), np.ascontiguousarray(normal), alpha, gt.cameras,
                        meta, depth)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_object_sample(synthetic_sample(), tmp_path_factory.mktemp("src") / "ellipsoid")


@pytest.fixture(scope="module")
def perturbed(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("dst") / "ellipsoid"
    return dst, perturb_object(src, dst, CFG)


def test_writer_round_trip_is_exact(tmp_path):
    sample = synthetic_sample(with_depth=True)
    seen = []
    folder = write_object_sample(sample, tmp_path, parent=True, extra=lambda p: seen.append(p.name))
    assert folder == tmp_path / "ellipsoid" and seen == ["ellipsoid" + schema.TMP_SUFFIX]
    assert not list(tmp_path.glob("*" + schema.TMP_SUFFIX))
    back = read_object_folder(folder)
    for name in ("rgba", "normal", "mask", "depth"):
        assert np.array_equal(getattr(back, name), getattr(sample, name)), name
    assert torch.equal(back.cameras.c2w, sample.cameras.c2w) and back.meta["has_depth"]
    with pytest.raises(Nova3DError, match="already exists"):
        write_object_sample(sample, folder)
    sample.rgba[0, 0] = 7
    write_object_sample(sample, folder, overwrite=True)
    assert (read_object_folder(folder).rgba[0, 0] == 7).all()


def test_input_and_untouched_views_are_bit_exact(src, perturbed):
    dst, record = perturbed
    a, b = read_object_folder(src), read_object_folder(dst)
    assert np.array_equal(a.rgba[UNTOUCHED], b.rgba[UNTOUCHED])
    assert np.array_equal(a.normal, b.normal) and np.array_equal(a.mask, b.mask)
    assert torch.equal(a.cameras.c2w[0], b.cameras.c2w[0]) and torch.equal(a.cameras.K, b.cameras.K)
    assert record.view_kinds == [None, "drift", None, "blotch", None, "blur", "drift", None]


def test_corruption_masks_mark_exactly_the_changes(src, perturbed):
    dst, record = perturbed
    a, b = read_object_folder(src), read_object_folder(dst)
    marked = load_corruption_masks(dst)
    diff = np.abs(a.rgba[:, :3].astype(int) - b.rgba[:, :3].astype(int)).max(1)
    assert np.array_equal(marked, (diff > CFG.change_threshold) & (a.mask > 0))
    assert np.array_equal(a.rgba[:, 3], b.rgba[:, 3])  # alpha kept
    assert (diff[a.rgba[:, 3] == 0] == 0).all()  # background pixels kept
    for v in CFG.color_views:
        assert marked[v].sum() >= 5, v  # every kind visibly changes its view
        assert record.corrupted_fraction[v] == pytest.approx(marked[v].sum() / (a.mask[v] > 0).sum())
    assert not marked[UNTOUCHED].any()


def test_pose_errors_bounded_and_recorded(src, perturbed):
    dst, record = perturbed
    true = Cameras.load(dst / "perturb" / "cameras_true.json")
    assert torch.equal(true.c2w, read_object_folder(src).cameras.c2w)
    moved = read_object_folder(dst).cameras
    rot, shift = pose_error(true.c2w, moved.c2w)
    assert rot[0] == 0 and shift[0] == 0
    assert (rot <= CFG.pose_rotation_deg + 1e-3).all()
    assert (shift <= CFG.pose_translation * true.radius + 1e-6).all()
    assert rot[1:].min() > 0 and shift[1:].min() > 0
    assert torch.allclose(rot, torch.tensor(record.rotation_deg), atol=2e-3)
    assert torch.allclose(shift, torch.tensor(record.translation), atol=1e-5)
    R = moved.c2w[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(V, 3, 3), atol=1e-5)  # still rigid


def test_record_round_trip_and_determinism(src, perturbed, tmp_path):
    dst, record = perturbed
    assert PerturbRecord.load(dst) == record
    assert json.loads((dst / "perturb" / "perturb.json").read_text())["config"]["seed"] == 3
    again = perturb_object(src, tmp_path / "again", CFG)
    assert again == record
    assert np.array_equal(read_object_folder(tmp_path / "again").rgba, read_object_folder(dst).rgba)
    other = perturb_object(src, tmp_path / "other", dataclasses.replace(CFG, seed=4))
    assert other.rotation_deg != record.rotation_deg


def test_exact_magnitudes_and_no_pose_change(src, tmp_path):
    rec = perturb_object(src, tmp_path / "max", PerturbConfig(color_views=[], pose_rotation_deg=10.0,
                                                              pose_translation=0.05, pose_magnitude="max"))
    true, moved = read_object_folder(src).cameras, read_object_folder(tmp_path / "max").cameras
    rot, shift = pose_error(true.c2w, moved.c2w)
    assert torch.allclose(rot[1:], torch.full((V - 1,), 10.0), atol=2e-3)
    assert torch.allclose(shift[1:], torch.full((V - 1,), 0.05 * true.radius), atol=1e-5)
    perturb_object(src, tmp_path / "none", PerturbConfig(color_views=[2], kinds=["blotch"]))
    assert torch.equal(read_object_folder(tmp_path / "none").cameras.c2w, true.c2w)


@pytest.mark.parametrize("cfg, message", [
    (PerturbConfig(color_views=[0, 3]), "input view"),
    (PerturbConfig(color_views=[8]), "out of range"),
    (PerturbConfig(color_views=[2], kinds=["smudge"]), "smudge"),
    (PerturbConfig(color_views=[], pose_rotation_deg=-1.0), "pose_rotation_deg"),
])
def test_bad_settings_raise(src, tmp_path, cfg, message):
    with pytest.raises(Nova3DError, match=message):
        perturb_object(src, tmp_path / "x", cfg)
    assert not (tmp_path / "x").exists()


def test_blur_keeps_a_constant_colour():
    rgb = torch.tensor([0.2, 0.5, 0.9])[:, None, None].expand(3, 16, 16)
    alpha = (torch.rand(16, 16) > 0.5).float()
    assert torch.allclose(gaussian_blur(rgb, alpha, 2.0)[:, alpha > 0], rgb[:, alpha > 0], atol=1e-5)


def test_cli(src, tmp_path, capsys):
    from nova3d.cli import main

    out = tmp_path / "cli"
    assert main(["perturb", "--views", str(src), "--out", str(out), "--color-views", "2", "4",
                 "--rotation", "3", "--translation", "0.01", "--seed", "1"]) == 0
    rec = PerturbRecord.load(out)
    assert rec.view_kinds[2] == "drift" and rec.view_kinds[4] == "blotch" and max(rec.rotation_deg) <= 3
    assert main(["perturb", "--views", str(src), "--out", str(tmp_path / "bad"), "--color-views", "0"]) == 2
    assert "input view" in capsys.readouterr().err
