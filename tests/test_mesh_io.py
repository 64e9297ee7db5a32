"""nova3d.mesh_io: world frame in memory, each format's axis convention at the file.

Round trips are identities; the stored numbers of .glb/.obj are Y-up (read raw with trimesh,
which keeps a file's axes); Blender's importers give back our Z-up vertices and colours (slow:
the real contract); fusion's exporter evaluated against itself scores perfectly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import trimesh

from data_prep.procedural import make_object
from nova3d import mesh_io
from nova3d.errors import Nova3DError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def mug() -> trimesh.Trimesh:
    """Vertex colours (sRGB, several parts, dark shades); Z up, handle towards +X, front -Y."""
    return make_object("mug")


@pytest.fixture(scope="module")
def crate() -> trimesh.Trimesh:
    """A UV image texture."""
    return make_object("crate")


def _corners(mesh: trimesh.Trimesh) -> np.ndarray:
    """[F, 3, 3] triangle corners: compares meshes whose vertices a format may split (STL)."""
    return np.asarray(mesh.vertices)[np.asarray(mesh.faces)]


@pytest.mark.parametrize("suffix", [".glb", ".gltf", ".obj", ".ply", ".stl"])
def test_round_trip_is_identity_with_vertex_colours(tmp_path: Path, mug, suffix: str) -> None:
    path = mesh_io.save_mesh(mug, tmp_path / f"mug{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing beside it, no .tmp left
    back = mesh_io.load_mesh(path)
    assert np.abs(_corners(back) - _corners(mug)).max() < 1e-6  # float32 in the file
    if suffix == ".stl":  # no colours, one vertex per corner
        return
    assert np.array_equal(back.faces, mug.faces)
    # sRGB bytes come back exactly, through glTF's linear COLOR_0 too
    assert back.visual.kind == "vertex"
    assert np.array_equal(back.visual.vertex_colors, mug.visual.vertex_colors)


def test_linear_colour_encoding_keeps_every_8_bit_value() -> None:
    srgb = np.arange(256)
    linear = mesh_io.srgb_to_linear(srgb / 255).astype(np.float32)  # what COLOR_0 stores
    assert np.array_equal(np.round(mesh_io.linear_to_srgb(linear) * 255), srgb)
    assert mesh_io.srgb_to_linear(np.array([0.5]))[0] == pytest.approx(0.2140, abs=1e-4)  # not identity


@pytest.mark.parametrize("suffix", [".glb", ".gltf", ".obj"])
def test_round_trip_keeps_the_texture(tmp_path: Path, crate, suffix: str) -> None:
    back = mesh_io.load_mesh(mesh_io.save_mesh(crate, tmp_path / f"crate{suffix}"))
    assert np.abs(_corners(back) - _corners(crate)).max() < 1e-6
    assert back.visual.kind == "texture"
    uv_back = np.asarray(back.visual.uv)[np.asarray(back.faces)]
    assert np.abs(uv_back - np.asarray(crate.visual.uv)[crate.faces]).max() < 1e-6
    material = back.visual.material
    image = getattr(material, "baseColorTexture", None) or material.image
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(crate.visual.material.image.convert("RGB")))
    if suffix == ".obj":  # .mtl and the image beside the .obj, named after it
        assert {p.name for p in tmp_path.iterdir()} == {"crate.obj", "crate.mtl", "crate.png"}


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_y_up_formats_store_the_object_upright_along_y(tmp_path: Path, mug, suffix: str) -> None:
    path = mesh_io.save_mesh(mug, tmp_path / f"mug{suffix}")
    raw = trimesh.load(path, force="mesh", process=False)  # trimesh keeps the file's axes
    world = np.asarray(mug.vertices)
    stored = np.asarray(raw.vertices)
    # up (world +Z, the mug's 0.9 height) is the file's +Y; the front (world -Y) faces the file's +Z
    assert np.allclose(stored, np.stack([world[:, 0], world[:, 2], -world[:, 1]], 1), atol=1e-6)
    assert stored[:, 1].min() == pytest.approx(0.0, abs=1e-6) and stored[:, 1].max() == pytest.approx(0.9)
    assert np.array_equal(mesh_io.file_transform(path), mesh_io.Y_UP_TO_Z_UP)
    # convert_axes=False: the stored numbers
    assert np.allclose(mesh_io.load_mesh(path, convert_axes=False).vertices, stored, atol=1e-6)


def test_ply_is_stored_as_is(tmp_path: Path, mug) -> None:
    path = mesh_io.save_mesh(mug, tmp_path / "mug.ply")
    assert np.allclose(trimesh.load(path, process=False).vertices, mug.vertices, atol=1e-6)
    assert np.array_equal(mesh_io.file_transform(path), np.eye(4))


def test_rotation_constants_are_exact_inverses() -> None:
    assert np.array_equal(mesh_io.Z_UP_TO_Y_UP @ mesh_io.Y_UP_TO_Z_UP, np.eye(4))
    assert np.array_equal(mesh_io.Z_UP_TO_Y_UP[:3, :3] @ [0, 0, 1], [0, 1, 0])  # up -> +Y
    assert np.array_equal(mesh_io.Z_UP_TO_Y_UP[:3, :3] @ [0, -1, 0], [0, 0, 1])  # front -> +Z
    assert np.linalg.det(mesh_io.Z_UP_TO_Y_UP) == 1.0  # a rotation, not a mirror


def test_unknown_format_is_one_line_error(tmp_path: Path, mug) -> None:
    with pytest.raises(Nova3DError, match=r"mug\.usd: unsupported mesh format \.usd"):
        mesh_io.save_mesh(mug, tmp_path / "mug.usd")
    with pytest.raises(Nova3DError, match="unsupported"):
        mesh_io.load_mesh(tmp_path / "mug.fbx")


@pytest.mark.slow
def test_blender_imports_our_files_in_the_world_frame(tmp_path: Path, mug) -> None:
    """bpy's glTF / OBJ / PLY importers (what data_prep.blender_scene uses) give back our Z-up
    vertices and our sRGB vertex colours."""
    from scipy.spatial import cKDTree

    from data_prep import blender_scene

    bpy = blender_scene._blender()
    world = np.asarray(mug.vertices)
    for suffix in (".glb", ".obj", ".ply"):
        path = mesh_io.save_mesh(mug, tmp_path / f"mug{suffix}")
        bpy.ops.wm.read_factory_settings(use_empty=True)
        blender_scene.import_mesh(path)
        [obj] = [o for o in bpy.context.scene.objects if o.type == "MESH"]
        verts, faces = blender_scene._world_vertices(obj, bpy.context.evaluated_depsgraph_get())
        assert faces == len(mug.faces), suffix
        # both ways: every Blender vertex is one of ours and every one of ours is in Blender
        assert cKDTree(world).query(verts)[0].max() < 1e-6, suffix
        assert cKDTree(verts).query(world)[0].max() < 1e-6, suffix
        attribute = obj.data.color_attributes[0]
        srgb = np.empty(len(attribute.data) * 4, np.float32)
        attribute.data.foreach_get("color_srgb", srgb)
        ours = {tuple(c) for c in mug.visual.vertex_colors[:, :3].tolist()}
        theirs = {tuple(c) for c in np.round(srgb.reshape(-1, 4)[:, :3] * 255).astype(int).tolist()}
        assert theirs == ours, suffix


def test_fusion_export_evaluated_against_itself_is_perfect(tmp_path: Path, mug) -> None:
    """Fusion's exporter -> nova3d eval (via mesh_io) against a GT folder of the same mesh."""
    from nova3d.eval.protocol import evaluate_object, get_protocol
    from nova3d.fusion.mesh import export_mesh
    from tests.helpers_eval import unit_box, write_gt_object

    mesh = unit_box(mug)
    gt = write_gt_object(tmp_path / "gt", "mug", mesh, views=2, res=32)
    paths = export_mesh(mesh, tmp_path / "pred" / "mug")
    protocol = get_protocol("gso", num_views=2, image_size=32, chamfer_points=2_000, iou_resolution=32,
                            lpips=False)
    for fmt, path in paths.items():
        for normalization in ("keep", "unit_box"):
            result = evaluate_object(path, gt, dataclasses.replace(protocol, normalization=normalization))
            assert result.status == "ok", (fmt, result.reason)
            # .glb is stored like GT's mesh.glb (float32): exactly 0; .obj is text (8 decimals)
            assert result.chamfer.chamfer <= (0.0 if fmt == "glb" else 1e-7), (fmt, normalization)
            assert result.iou.iou == 1.0, (fmt, normalization)
            assert result.appearance.psnr > 40, (fmt, result.appearance.psnr)  # the same colours
