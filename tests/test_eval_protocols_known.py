"""Known answers per named protocol (nova3d/eval/protocols.py, scoring.py): analytic meshes whose CD
and IoU follow from geometry, so each protocol's choices show in the numbers.

  sphere r 0.55 vs GT r 0.5 (a prediction 10 % too large): every point is 0.05 from the other
      surface -> CD 0.050; IoU = (0.5 / 0.55)^3 = 0.7513. Protocols that normalise both meshes
      (eschernet, aligned) see two identical spheres: CD 0, IoU 1, by design.
  unit box shifted by 0.05 along x: IoU = 0.95 / 1.05 = 0.9048; surface CD of the continuous
      surfaces = 0.01669 (derivation in test_box_shifted_by_0_05); again 0 / 1 for eschernet, aligned.
  identical meshes (in the unit box, as GT is): CD 0, IoU 1, F-score 1 under every protocol. (GT-only
      protocols unit-box the GT alone: a GT outside the unit box is moved, its identical twin not.)
  a box with its +x face removed (open mesh): the 6-ray vote fills it (IoU 1 against the closed box);
      the single ray along +x of mesh2sdf (SyncDreamer, EscherNet) counts every grid node behind the
      hole as inside: 48 of 64 node columns instead of 32 -> IoU exactly 2/3.
"""
from __future__ import annotations

import math

import pytest
import torch
import trimesh

from nova3d.eval import geometry
from nova3d.eval.normalize import frame_rotation
from nova3d.eval.protocols import PROTOCOLS, SYNCDREAMER, get_protocol
from nova3d.eval.scoring import protocol_cameras, score_geometry

pytestmark = pytest.mark.usefixtures("one_thread")
SPHERE_IOU = (0.5 / 0.55) ** 3  # 0.7513
BOX_IOU = 0.95 / 1.05  # 0.9048
# Mean distance from the shifted box's surface to the box's (x-faces 0.05 and 0.045167, the four
# side faces 0.05 * 0.025 each per unit area; see the test), equal both ways.
BOX_SURFACE_CD = (4 * 0.05 * 0.025 + 0.05 + (1 - 0.9**3) / 6) / 6  # 0.01669


def sphere(radius: float) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=radius)


def box(shift: float = 0.0) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    mesh.apply_translation([shift, 0.0, 0.0])
    return mesh


def score(name: str, pred, gt):
    return score_geometry(pred, gt, get_protocol(name))


def test_sphere_ten_percent_too_large() -> None:
    sd = score("syncdreamer", sphere(0.55), sphere(0.5))
    assert sd.chamfer.sampling == "depth" and sd.chamfer.voxel_size == 0.01
    assert sd.chamfer.chamfer == pytest.approx(0.050, abs=0.002)
    assert sd.iou.iou == pytest.approx(SPHERE_IOU, abs=0.01) and sd.iou.grid == "mesh2sdf"
    ours = score("nova3d", sphere(0.55), sphere(0.5))
    assert ours.chamfer.sampling == "surface" and ours.chamfer.chamfer == pytest.approx(0.050, abs=0.002)
    assert ours.iou.iou == pytest.approx(SPHERE_IOU, abs=0.01)
    assert ours.alignment.pred_transform.scale == 1.0  # the prediction is scored as stored
    esc = score("eschernet", sphere(0.55), sphere(0.5))  # both unit-boxed: identical spheres
    assert esc.chamfer.sampling == "vertices" and esc.chamfer.chamfer < 1e-6 and esc.iou.iou == 1.0
    aligned = score("aligned", sphere(0.55), sphere(0.5))
    assert aligned.chamfer.chamfer < 1e-5 and aligned.iou.iou == 1.0 and aligned.alignment.icp is not None


def test_box_shifted_by_0_05() -> None:
    """Surface CD of the continuous surfaces: side faces (area 4) are 0 away except a 0.05 strip at
    mean 0.025; the +x face is 0.05 away; a point (-0.45, y, z) of the -x face is min(0.05, 0.5-|y|,
    0.5-|z|) away, mean int_0^0.05 (1 - 2t)^2 dt = (1 - 0.9^3) / 6. Sampling 100k points adds at most
    about half their spacing (0.5 * sqrt(6 / 1e5) = 0.004) on the coincident faces."""
    ours = score("nova3d", box(0.05), box())
    assert BOX_SURFACE_CD <= ours.chamfer.chamfer <= BOX_SURFACE_CD + 0.004
    assert ours.iou.iou == pytest.approx(BOX_IOU, abs=0.01)
    sd = score("syncdreamer", box(0.05), box())
    assert 0.01 < sd.chamfer.chamfer < 0.03  # visible surfaces only: no analytic value, but not 0
    assert sd.iou.iou == pytest.approx(BOX_IOU, abs=0.01)
    for name in ("eschernet", "aligned"):  # placement forgiven by design
        forgiving = score(name, box(0.05), box())
        assert forgiving.chamfer.chamfer < 1e-6 and forgiving.iou.iou == 1.0, name


@pytest.mark.parametrize("name", ["nova3d", "syncdreamer", "eschernet", "aligned"])
def test_identical_meshes_score_perfectly(name: str) -> None:
    mesh = trimesh.creation.torus(0.3, 0.12)
    mesh.apply_scale(1 / mesh.extents.max())  # a GT as data_prep.gso writes it: in the unit box
    result = score(name, mesh, mesh)
    assert result.chamfer.chamfer == 0.0 and result.chamfer.fscore == 1.0 and result.iou.iou == 1.0


def test_open_mesh_iou_vote_versus_single_ray() -> None:
    closed = box()
    open_box = trimesh.Trimesh(closed.vertices, closed.faces[closed.triangles_center[:, 0] < 0.49], process=False)
    assert len(open_box.faces) == 10
    for grid in ("mesh2sdf", "union_bbox"):
        assert geometry.volume_iou(open_box, closed, 64, grid, "vote6").iou == 1.0
    single = geometry.volume_iou(open_box, closed, 64, "mesh2sdf", "single_ray_x")
    assert single.iou == pytest.approx(2 / 3, abs=1e-12) and single.method.startswith("ray_parity_single_x")
    assert single.occupied_pred == 48 * 32 * 32 and single.occupied_gt == 32**3


def test_fixed_grid_reports_what_it_cannot_see() -> None:
    big = box()
    big.apply_scale(1.3)
    clipped = geometry.volume_iou(big, box(), 32, "unit_box")
    assert clipped.iou == 1.0  # wrong, and said so:
    assert clipped.pred_outside_grid == 1.0 and clipped.gt_outside_grid == 0.0
    honest = geometry.volume_iou(big, box(), 64, "union_bbox")
    assert honest.iou == pytest.approx(1 / 1.3**3, abs=0.03) and honest.pred_outside_grid == 0.0


def test_syncdreamer_cameras_and_frame_conversion() -> None:
    """SyncDreamer's meta_info/camera-16.pkl: K = [[280, 0, 128], [0, 280, 128]], view k at azimuth
    22.5 k counter-clockwise from +X, elevation 30, radius 1.5, +Z up (view 0 centre (1.299, 0, 0.75),
    view 4 (0, 1.299, 0.75)). Turned into nova3d's frame they must be the protocol's views k."""
    cams = protocol_cameras(SYNCDREAMER)
    assert len(cams) == 16 and cams.width == 256
    assert float(cams.K[0, 0, 0]) == pytest.approx(280.0, abs=1e-3) and float(cams.K[0, 0, 2]) == 128.0
    R = frame_rotation("syncdreamer")
    assert torch.equal(R @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0.0, -1, 0], dtype=torch.float64))
    for k in (0, 1, 4, 9):
        az = math.radians(22.5 * k)
        theirs = 1.5 * torch.tensor([math.cos(math.radians(30)) * math.cos(az),
                                     math.cos(math.radians(30)) * math.sin(az), math.sin(math.radians(30))])
        assert torch.allclose((R @ theirs.double()).float(), cams.c2w[k, :3, 3], atol=1e-4), k


def test_peer_mesh_frame_is_an_explicit_option() -> None:
    gt = trimesh.creation.box(extents=(0.3, 1.0, 0.6))  # asymmetric: a turn of 90 degrees shows
    theirs = gt.copy()
    rot = torch.eye(4, dtype=torch.float64)
    rot[:3, :3] = frame_rotation("syncdreamer").T  # nova3d -> SyncDreamer: how their method stores it
    theirs.apply_transform(rot.numpy())
    as_stored = score_geometry(theirs, gt, get_protocol("nova3d"))
    converted = score_geometry(theirs, gt, get_protocol("nova3d", pred_frame="syncdreamer"))
    assert as_stored.chamfer.chamfer > 0.05 and as_stored.iou.iou < 0.5
    assert converted.chamfer.chamfer < 1e-6 and converted.iou.iou == 1.0
    with pytest.raises(ValueError, match="unknown mesh frame"):
        frame_rotation("zero123")


def test_registry_names_aliases_and_bad_fields() -> None:
    from nova3d.errors import Nova3DError

    assert PROTOCOLS["gso"] is PROTOCOLS["nova3d"]
    assert get_protocol("gso").normalization == "keep"  # the default forgives nothing
    assert get_protocol("eschernet").normalization == "unit_box"
    with pytest.raises(Nova3DError, match="iou_inside must be one of vote6, single_ray_x"):
        get_protocol("nova3d", iou_inside="winding")
    with pytest.raises(Nova3DError, match="protocol 'nova3d' has no field 'colour'"):
        get_protocol("nova3d", colour=True)


# SyncDreamer's 30-object GSO split as HarmonyView's gso_evaluation.sh lists it (object_name).
HARMONYVIEW_OBJECT_NAMES = ("alarm backpack bell blocks chicken cream elephant grandfather grandmother hat leather "
                            "lion lunch_bag mario oil school_bus1 school_bus2 shoe shoe1 shoe2 shoe3 soap sofa sorter "
                            "sorting_board stucking_cups teapot toaster train turtle")


def test_syncdreamer_gso30_split_loads_with_its_turns() -> None:
    from nova3d.eval.protocols import SYNCDREAMER_GSO30, SYNCDREAMER_GSO30_SOURCES, syncdreamer_gt_turn
    from nova3d.errors import Nova3DError

    assert tuple(SYNCDREAMER_GSO30) == tuple(HARMONYVIEW_OBJECT_NAMES.split())  # 30, in their order
    assert len(SYNCDREAMER_GSO30) == 30
    # get_gt_rotate_angle: sofa -90; 11 objects 270; elephant, school_bus1 180; 4 objects 225; sorter 112.5
    turned = {k: v for k, v in SYNCDREAMER_GSO30.items() if v}
    assert len(turned) == 19 and turned["sofa"] == -90.0 and turned["sorter"] == 112.5
    assert sorted(k for k, v in turned.items() if v == 225.0) == ["school_bus2", "shoe", "train", "turtle"]
    assert sum(v == 270.0 for v in turned.values()) == 11 and syncdreamer_gt_turn("chicken") == 270.0
    assert any("HarmonyView" in s for s in SYNCDREAMER_GSO30_SOURCES)
    assert any("get_gt_rotate_angle" in s for s in SYNCDREAMER_GSO30_SOURCES)
    with pytest.raises(Nova3DError, match="not in SyncDreamer's GSO 30-object split"):
        syncdreamer_gt_turn("CHICKEN_NESTING")


def test_syncdreamer_gt_vertices_follow_transform_gt() -> None:
    import numpy as np

    from nova3d.eval.protocols import syncdreamer_gt_vertices

    # a GSO-like OBJ: Z up, resting on z = 0, 0.4 long in x, 0.2 deep, 0.1 high (metres)
    v = trimesh.creation.box(extents=(0.4, 0.2, 0.1)).vertices + np.array([0.01, -0.02, 0.05])
    plain = syncdreamer_gt_vertices(v, "bell")  # turn 0: norm_coords only
    assert np.allclose(plain.max(0), [0.5, 0.25, 0.125]) and np.allclose(plain.min(0), [-0.5, -0.25, -0.125])
    # chicken: 270 deg -> euler2mat(-270 deg, 0, 0, 'szyx') = Rz(+90 deg): +X goes to +Y
    chicken = syncdreamer_gt_vertices(v, "chicken")
    assert np.allclose(chicken.max(0), [0.25, 0.5, 0.125]) and np.allclose(chicken.min(0), [-0.25, -0.5, -0.125])
    top_front = np.argmax(plain[:, 0] + plain[:, 1] + plain[:, 2])  # corner (+0.5, +0.25, +0.125)
    assert np.allclose(chicken[top_front], [-0.25, 0.5, 0.125])
    # normalised BEFORE the turn (their order): a 225 deg turn leaves a bounding box wider than 1
    shoe = syncdreamer_gt_vertices(v, "shoe")
    assert (shoe.max(0) - shoe.min(0))[:2].max() == pytest.approx((0.5 + 0.25) * math.sqrt(2), abs=1e-9)
