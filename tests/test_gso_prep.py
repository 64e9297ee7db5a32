"""data_prep/gso.py: a fake GSO folder (procedural objects written the way GSO ships them:
meshes/model.obj Z-up as GSO stores it + model.mtl + materials/textures/texture.png) rendered into evaluation
ground truth with the real Blender renderer, then evaluated against itself with nova3d eval.
The Blender part is `slow` (64², 2 samples); input checks are fast."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from data_prep import gso, gt_mesh
from data_prep.procedural import make_object
from nova3d import mesh_io
from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.data.png import read_png

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 64
OBJECTS = ("crate", "mug")  # a UV texture; vertex colours baked into a palette texture


def write_gso_object(root: Path, name: str) -> Path:
    """root/name/meshes/model.obj (+ .mtl, texture.png) of procedural object `name`, Z-up like GSO's OBJs
    (every GSO object rests on z = 0; SyncDreamer's chicken GT renders fit it read as stored)."""
    mesh = make_object(name)
    folder = root / name
    (folder / "meshes").mkdir(parents=True)
    (folder / "materials" / "textures").mkdir(parents=True)
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        uv, image = np.asarray(mesh.visual.uv), mesh.visual.material.image.convert("RGB")
    else:  # one palette cell (4x4 px) per distinct vertex colour, each vertex's uv at its cell centre
        colours, index = np.unique(np.asarray(mesh.visual.vertex_colors)[:, :3], axis=0, return_inverse=True)
        image = Image.fromarray(np.repeat(np.repeat(colours[None].astype(np.uint8), 4, 0), 4, 1), "RGB")
        uv = np.stack([(index.reshape(-1) + 0.5) / len(colours), np.full(len(index), 0.5)], -1)
    image.save(folder / "materials" / "textures" / "texture.png")
    v_obj = np.asarray(mesh.vertices)  # nova3d's world frame is Z up: stored as is, like GSO
    lines = ["mtllib model.mtl", "usemtl material_0"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v_obj]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
    lines += ["f " + " ".join(f"{i + 1}/{i + 1}" for i in face) for face in np.asarray(mesh.faces)]
    (folder / "meshes" / "model.obj").write_text("\n".join(lines) + "\n")
    (folder / "meshes" / "model.mtl").write_text(
        "newmtl material_0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nmap_Kd ../materials/textures/texture.png\n")
    return folder


@pytest.fixture(scope="module")
def fake_gso(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gso")
    for name in OBJECTS:
        write_gso_object(root, name)
    (root / "no_model" / "meshes").mkdir(parents=True)  # a GSO folder missing its model.obj
    return root


def test_find_objects_lists_folders_without_a_model(fake_gso: Path) -> None:
    sources, problems = gso.find_objects(fake_gso)
    assert [s.object_id for s in sources] == list(OBJECTS)
    assert [p["object"] for p in problems] == ["no_model"] and "model.obj" in problems[0]["reason"]


@pytest.mark.parametrize("argv, message", [
    (["--objects", "nope"], "--objects: nope not in"),
    (["--protocol", "nope"], "unknown protocol 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(fake_gso: Path, tmp_path: Path, capsys, argv, message) -> None:
    assert gso.main(["--gso", str(fake_gso), "--out", str(tmp_path / "gt"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert gso.main(["--gso", str(tmp_path / "missing"), "--out", str(tmp_path / "gt")]) == 2


@pytest.fixture(scope="module")
def prepared(fake_gso: Path, tmp_path_factory) -> tuple[Path, gso.GsoSummary]:
    out = tmp_path_factory.mktemp("gso_gt")
    summary = gso.prepare_gso(fake_gso, out, samples=2, resolution=RES, progress=False)
    return out, summary


@pytest.mark.slow
def test_gso_prep_renders_ground_truth_that_agrees_with_its_mesh(prepared) -> None:
    from nova3d.eval.mesh_render import render_mesh
    from nova3d.eval.protocol import load_mesh

    out, summary = prepared
    assert summary.rendered == list(OBJECTS) and summary.meshes_written == list(OBJECTS)
    assert [f["object"] for f in summary.failed] == ["no_model"]
    assert "no_model" in (out / "failures.jsonl").read_text()
    for name in OBJECTS:
        folder = out / name
        assert schema.missing_files(folder) == []
        meta = schema.ObjectMeta.load(folder / schema.META_FILE)
        cams = Cameras.load(folder / schema.CAMERAS_FILE)
        assert meta.has_depth and meta.num_views == 16 and cams.width == RES
        assert torch.allclose(cams.elevation_deg, torch.zeros(16)) and float(cams.azimuth_deg[0]) == 0.0
        info = json.loads((folder / gt_mesh.MESH_INFO).read_text())
        assert info["vertices_in_mask_min"] > 0.98
        # Independent of the prep's own check: our rasteriser's silhouettes of mesh.glb at the
        # GT cameras against Blender's masks.
        mesh = load_mesh(folder / gso.GT_MESH)
        ours = render_mesh(mesh, cams, RES).mask[:, 0] > 0.5
        blender = torch.from_numpy(np.stack([read_png(folder / "mask" / schema.view_name(i), 1, np.uint8)[0]
                                             for i in range(16)]) > 127)
        iou = (ours & blender).sum((1, 2)).float() / (ours | blender).sum((1, 2)).float()
        assert float(iou.min()) > 0.9, (name, iou)
        assert (mesh.verts.max(0).values - mesh.verts.min(0).values).max() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_gso_prep_resumes_and_rejects_a_mesh_that_disagrees(prepared, fake_gso: Path, monkeypatch) -> None:
    out, _ = prepared
    again = gso.prepare_gso(fake_gso, out, samples=2, resolution=RES, progress=False)
    assert again.skipped == list(OBJECTS) and again.rendered == [] and again.meshes_written == []
    # The wrong axis convention must be caught by the render/mesh agreement check: the GSO OBJ
    # itself (Z up) read as a Y-up file, what data_prep.gso did before it staged a Y-up copy.
    copy = out.parent / "wrong_axes"
    shutil.copytree(out / "mug", copy)
    source = gso.find_objects(fake_gso)[0][1]
    with pytest.raises(ValueError, match="unit box|disagrees"):
        gso.write_gt_mesh(source, copy)
    info = json.loads((out / "mug" / gt_mesh.MESH_INFO).read_text())
    assert info["staging"]["obj_up"] == "z" and info["staging"]["turn"] == np.eye(3).tolist()
    assert not (out / gso.STAGING_DIR).exists()


@pytest.mark.slow
def test_ground_truth_evaluated_against_itself(prepared, tmp_path: Path) -> None:
    from nova3d.eval.protocol import evaluate_set, get_protocol

    out, _ = prepared
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in OBJECTS:
        shutil.copy(out / name / gso.GT_MESH, pred / f"{name}.glb")
    protocol = get_protocol("gso", image_size=RES, chamfer_points=20_000)
    summary = evaluate_set(pred, out, protocol, tmp_path / "eval", progress=False)
    assert [o.status for o in summary.objects] == ["ok", "ok"]
    for o in summary.objects:
        assert o.chamfer.chamfer == 0.0 and o.iou.iou == 1.0
        # Blender's lit, anti-aliased renders vs our unlit rasteriser of the same textured mesh.
        assert o.appearance.psnr > 18 and o.appearance.ssim > 0.8, (o.object_id, o.appearance.psnr)


@pytest.mark.parametrize("protocol, elevation, fov", [("nova3d", 0.0, 49.1), ("syncdreamer", 30.0, 49.134)])
def test_gt_is_rendered_at_the_protocols_orbit(fake_gso: Path, tmp_path: Path, monkeypatch, protocol, elevation,
                                               fov) -> None:
    """SyncDreamer's GT views: elevation 30°, f = 280 px at 256² (FOV 2 atan(128/280) = 49.134°)."""
    import data_prep.render_views as rv
    from data_prep.render_io import RenderSummary

    seen = []
    monkeypatch.setattr(rv, "render_objects", lambda todo, out, settings, progress: seen.append(settings)
                        or RenderSummary())
    gso.prepare_gso(fake_gso, tmp_path / "gt", protocol, progress=False)
    (settings,) = seen
    assert settings.elevation == (elevation,) and settings.fov == pytest.approx(fov, abs=1e-3)
    assert settings.views == 16 and settings.resolution == 256 and settings.radius == 1.5 and settings.depth


def test_gt_at_another_orbit_is_not_taken_for_done(fake_gso: Path, tmp_path: Path, monkeypatch) -> None:
    import data_prep.render_views as rv
    from data_prep.render_io import RenderSummary
    from tests.helpers_eval import write_gt_object

    out = tmp_path / "gt"
    write_gt_object(out, "crate", make_object("crate"), views=16, res=32, elevation_deg=0.0)  # a nova3d-orbit GT
    monkeypatch.setattr(rv, "render_objects", lambda todo, out, settings, progress: RenderSummary())
    summary = gso.prepare_gso(fake_gso, out, "syncdreamer", objects=["crate"], progress=False)
    assert summary.skipped == [] and [f["object"] for f in summary.failed] == ["crate"]
    assert "elevation 0°" in summary.failed[0]["reason"] and "another --out" in summary.failed[0]["reason"]
    assert gso.prepare_gso(fake_gso, out, "nova3d", objects=["crate"], resolution=32, progress=False).skipped == ["crate"]


def test_peer_meshes_are_turned_into_nova3d_frame(tmp_path: Path, capsys) -> None:
    from nova3d.eval.normalize import frame_rotation
    from nova3d.eval.protocol import load_mesh

    ours = make_object("mug")  # nova3d's frame: the handle side as our cameras see it
    theirs = ours.copy()
    turn = np.eye(4)
    turn[:3, :3] = frame_rotation("syncdreamer").numpy().T  # how SyncDreamer's frame stores it
    theirs.apply_transform(turn)
    peer = tmp_path / "peer"
    (peer / "mug").mkdir(parents=True)
    theirs.export(peer / "mug" / "mesh.ply")  # .ply: coordinates as stored
    assert gso.main(["--convert-meshes", str(peer), "--frame", "syncdreamer", "--out", str(tmp_path / "pred")]) == 0
    back = load_mesh(tmp_path / "pred" / "mug.glb")
    assert torch.allclose(back.verts, torch.as_tensor(ours.vertices, dtype=torch.float32), atol=1e-5)
    assert json.loads((tmp_path / "pred" / "frame.json").read_text())["frame"] == "syncdreamer"
    capsys.readouterr()
    for argv, message in ((["--convert-meshes", str(peer)], "--convert-meshes needs --frame"),
                          (["--convert-meshes", str(peer), "--frame", "zero123"], "--frame 'zero123': known frames"),
                          (["--convert-meshes", str(tmp_path / "none"), "--frame", "syncdreamer"], "folder not found")):
        assert gso.main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_staged_obj_is_the_gso_obj_as_stored_for_blenders_y_up_import(fake_gso: Path, tmp_path: Path) -> None:
    """GSO's OBJs are Z-up: Blender's OBJ importer (Y-up -> Z-up, as mesh_io.load_mesh) must see a copy
    whose import gives the OBJ as stored (times the GT turn), with its material and texture intact."""
    source = gso.find_objects(fake_gso)[0][0]  # crate: a UV texture via ../materials/textures
    stored = mesh_io.load_mesh(source.path, convert_axes=False)
    staged = gso.stage_obj(source, tmp_path / "staging", np.eye(3))
    assert staged.source == source.source and staged.path != source.path
    upright = mesh_io.load_mesh(staged.path)  # the importer's turn, as Blender does it
    assert np.allclose(upright.vertices, stored.vertices, atol=1e-6)
    assert upright.visual.material.image is not None  # model.mtl -> ../materials/textures/texture.png
    turn = gso.gt_turn("chicken", turns="syncdreamer")  # Rz(+90) (their 270 deg), then their +X -> our -Y
    turned = mesh_io.load_mesh(gso.stage_obj(source, tmp_path / "staging", turn).path)
    assert np.allclose(turned.vertices, stored.vertices @ turn.T, atol=1e-6)
    assert np.allclose(turn, np.eye(3), atol=1e-12)  # -270 then -90: a full turn for the chicken
    assert np.allclose(gso.gt_turn("CHICKEN_NESTING", turns="syncdreamer"), turn)
    assert np.allclose(gso.gt_turn("bell", turns="syncdreamer") @ [1, 0, 0], [0, -1, 0])  # their view 0 -> ours
    with pytest.raises(ValueError, match="not in SyncDreamer's GSO 30-object split"):
        gso.gt_turn("crate", turns="syncdreamer")
    # --obj-up y: the OBJ read as a Y-up file (the old reading: GSO objects on their side)
    lying = mesh_io.load_mesh(gso.stage_obj(source, tmp_path / "staging", np.eye(3), "y").path)
    assert np.allclose(lying.vertices, mesh_io.load_mesh(source.path).vertices, atol=1e-6)


def test_gt_turns_and_flat_layout_reach_the_renderer(tmp_path: Path, monkeypatch, capsys) -> None:
    """SyncDreamer's gso-eval layout (<name>/model.obj) is found; --gt-turns syncdreamer stages each
    object turned, and an object outside its split fails alone, with the reason."""
    import data_prep.render_views as rv
    from data_prep.render_io import RenderSummary

    root = tmp_path / "gso-eval"
    for name in ("crate", "bell"):
        folder = write_gso_object(root, name if name == "crate" else "mug")
        if name == "bell":
            folder = folder.rename(root / "bell")
        (folder / "meshes" / "model.obj").rename(folder / "model.obj")
        (folder / "meshes" / "model.mtl").rename(folder / "model.mtl")
    seen = []
    monkeypatch.setattr(rv, "render_objects", lambda todo, out, settings, progress: seen.extend(
        (s.object_id, mesh_io.load_mesh(s.path).vertices.copy()) for s in todo) or RenderSummary())
    summary = gso.prepare_gso(root, tmp_path / "gt", "syncdreamer", turns="syncdreamer", progress=False)
    assert [o for o, _ in seen] == ["bell"]
    stored = mesh_io.load_mesh(root / "bell" / "model.obj", convert_axes=False).vertices
    assert np.allclose(seen[0][1], stored @ gso.gt_turn("bell", turns="syncdreamer").T, atol=1e-6)
    assert [f["object"] for f in summary.failed] == ["crate"] and "30-object split" in summary.failed[0]["reason"]
    assert not (tmp_path / "gt" / gso.STAGING_DIR).exists()
    for flag in ("--gt-turns", "--obj-up"):
        assert gso.main(["--gso", str(root), "--out", str(tmp_path / "x"), flag, "nope"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{flag} must be one of" in err and "\n" not in err
