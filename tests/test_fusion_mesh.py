"""Mesh export (nova3d.fusion.mesh): marching cubes of analytic SDFs, clean-up, vertex colours,
the xatlas texture bake and the file round trip. Small grids: the file runs in a few seconds."""
import math

import numpy as np
import pytest
import torch
import trimesh

from nova3d.cameras import OrbitSpec, orbit_cameras
from nova3d.errors import Nova3DError
from nova3d.eval.mesh_render import render_mesh
from nova3d.fusion.mesh import (MeshExportConfig, bake_texture, clean_mesh, color_vertices, export_mesh,
                                extract_mesh, sample_texture)
from nova3d.mesh_io import load_mesh

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

R, BOUND, RES = 0.4, 0.75, 40
CELL = 2 * BOUND / (RES - 1)


def sphere(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - R


def position_color(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (p / (2 * BOUND) + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def sphere_mesh() -> trimesh.Trimesh:
    return clean_mesh(extract_mesh(sphere, BOUND, RES, chunk=4096, progress=False))


@pytest.fixture(scope="module")
def textured(sphere_mesh) -> trimesh.Trimesh:
    return bake_texture(sphere_mesh, position_color, size=256, progress=False)


def test_config_defaults_are_plain():
    cfg = MeshExportConfig()
    assert cfg.formats == ["glb", "obj", "ply"] and cfg.formats is not MeshExportConfig().formats
    from omegaconf import OmegaConf
    assert OmegaConf.to_object(OmegaConf.structured(cfg)) == cfg


def test_sphere_is_closed_outward_and_on_the_surface(sphere_mesh):
    m = sphere_mesh
    assert m.is_watertight and m.is_winding_consistent
    radii = np.linalg.norm(m.vertices, axis=1)
    assert np.abs(radii - R).max() < CELL
    # Outward winding: positive signed volume close to the ball's, and face normals point away.
    assert m.volume == pytest.approx(4 / 3 * math.pi * R ** 3, rel=0.03)
    assert (np.einsum("ij,ij->i", m.face_normals, m.triangles_center) > 0).all()


def test_field_module_on_its_device():
    """A bound method of a module (the lead's system.sdf_fn) works; the prior field is the sphere."""
    from nova3d.fusion.field import FieldConfig, FusionField
    from nova3d.fusion.hashgrid import HashGridConfig

    grid = HashGridConfig(levels=2, features_per_level=2, log2_table_size=8, base_resolution=4, max_resolution=8)
    field = FusionField(FieldConfig(num_views=2, hashgrid=grid, sdf_hidden=16, sphere_radius=R))
    m = extract_mesh(field.geometry.sdf, field.cfg.bound, 24, progress=False)
    assert np.abs(np.linalg.norm(m.vertices, axis=1) - R).max() < 2 * field.cfg.bound / 23


def test_clean_drops_a_small_floater():
    floater = torch.tensor([0.58, 0.0, 0.0])
    sdf = lambda p: torch.minimum(sphere(p), (p - floater).norm(dim=-1) - 0.07)
    raw = extract_mesh(sdf, BOUND, RES, progress=False)
    assert raw.body_count == 2
    clean = clean_mesh(raw, 0.05)
    assert clean.body_count == 1 and clean.is_watertight
    assert np.linalg.norm(clean.vertices, axis=1).max() < R + CELL  # the big sphere stayed
    assert len(clean_mesh(raw, 0.0).faces) == len(raw.faces)  # fraction 0 keeps everything


def test_empty_and_broken_fields_raise():
    with pytest.raises(Nova3DError, match="empty field"):
        extract_mesh(lambda p: p.norm(dim=-1) + 1.0, BOUND, 16, progress=False)
    with pytest.raises(Nova3DError, match="empty field"):
        extract_mesh(lambda p: -torch.ones(len(p)), BOUND, 16, progress=False)
    with pytest.raises(Nova3DError, match="non-finite"):
        extract_mesh(lambda p: sphere(p) / 0 * 0, BOUND, 16, progress=False)


def test_surface_reaching_the_cube_is_closed():
    m = extract_mesh(lambda p: p.norm(dim=-1) - 0.6, 0.5, 16, progress=False)  # cut by the cube's faces
    assert m.is_watertight and m.volume > 0


def test_vertex_colours_and_normals():
    m = clean_mesh(extract_mesh(sphere, BOUND, 24, progress=False))
    color_vertices(m, position_color, chunk=1000, progress=False)
    expected = np.round(position_color(torch.tensor(m.vertices), None).numpy() * 255)
    assert np.abs(m.visual.vertex_colors[:, :3].astype(float) - expected).max() <= 1
    # The normals handed to color_fn are the outward ones: colour by (n + 1) / 2 and compare.
    color_vertices(m, lambda p, n: (n + 1) / 2, progress=False)
    radial = (m.vertices / np.linalg.norm(m.vertices, axis=1, keepdims=True) + 1) / 2
    assert np.abs(m.visual.vertex_colors[:, :3] / 255 - radial).mean() < 0.02


def test_texture_matches_vertex_colours(sphere_mesh, textured):
    assert textured.visual.kind == "texture"
    image = np.asarray(textured.visual.material.image.convert("RGB"))
    assert image.shape == (256, 256, 3)
    at_verts = sample_texture(image, textured.visual.uv)
    expected = position_color(torch.tensor(textured.vertices), None).numpy()
    assert np.abs(at_verts - expected).mean() < 0.01
    # Rendered, the textured mesh looks like the vertex-coloured one.
    coloured = color_vertices(sphere_mesh.copy(), position_color, progress=False)
    cams = orbit_cameras(OrbitSpec(num_views=2, resolution=48, elevation_deg=20.0))
    a, b = render_mesh(textured, cams, 48), render_mesh(coloured, cams, 48)
    assert torch.equal(a.mask, b.mask) and a.mask.mean() > 0.2
    assert (a.rgb - b.rgb).abs().mean() < 0.01


@pytest.mark.parametrize("kind", ["vertex", "texture"])
def test_export_round_trip(tmp_path, sphere_mesh, textured, kind):
    mesh = textured if kind == "texture" else color_vertices(sphere_mesh.copy(), position_color, progress=False)
    paths = export_mesh(mesh, tmp_path, "obj1")
    assert set(paths) == {"glb", "obj", "ply"} and all(p.is_file() for p in paths.values())
    assert not list(tmp_path.glob("*.tmp"))
    for fmt, path in paths.items():
        loaded = load_mesh(path)  # back in the world frame (.glb/.obj are stored Y-up)
        assert len(loaded.vertices) == len(mesh.vertices), fmt
        assert np.allclose(np.asarray(loaded.vertices), mesh.vertices, atol=1e-5), fmt
        if kind == "vertex" or fmt == "ply":  # ply stores a textured mesh's colours per vertex
            assert loaded.visual.kind == "vertex", fmt
            expected = position_color(torch.tensor(mesh.vertices), None).numpy()
            assert np.abs(loaded.visual.vertex_colors[:, :3] / 255 - expected).mean() < 0.01, fmt
        else:
            assert loaded.visual.kind == "texture", fmt
            mat = loaded.visual.material
            image = getattr(mat, "baseColorTexture", None) or mat.image
            assert image.size == (256, 256), fmt
            assert np.abs(sample_texture(np.asarray(image.convert("RGB")), loaded.visual.uv)
                          - sample_texture(np.asarray(mesh.visual.material.image), mesh.visual.uv)).max() < 1e-6
    if kind == "texture":
        assert (tmp_path / "obj1.mtl").is_file() and (tmp_path / "obj1.png").is_file()


def test_export_rejects_unknown_formats(tmp_path, sphere_mesh):
    with pytest.raises(Nova3DError, match="stl"):
        export_mesh(sphere_mesh, tmp_path, formats=["glb", "stl"])


@pytest.mark.parametrize("resolution", [96, 97])
def test_coarse_to_fine_grid_equals_dense(resolution):
    """For a distance function the sparse grid gives the dense grid's mesh with fewer evaluations."""
    from nova3d.fusion.mesh import sample_grid

    floater = torch.tensor([0.5, 0.2, -0.1])
    sdf = lambda p: torch.minimum(sphere(p), (p - floater).norm(dim=-1) - 0.1)
    dense = sample_grid(sdf, BOUND, resolution, coarse=1, progress=False)
    sparse = sample_grid(sdf, BOUND, resolution, coarse=4, progress=False)
    assert sparse.evaluated < 0.6 * dense.evaluated
    assert np.array_equal(np.sign(sparse.values), np.sign(dense.values))
    evaluated = np.abs(sparse.values) != np.float32(sparse.fill)  # the rest hold +-fill
    near = np.abs(dense.values) < 2 * BOUND / (resolution - 1)  # within a fine cell of the surface
    assert (near <= evaluated).all()
    assert np.array_equal(sparse.values[evaluated], dense.values[evaluated])
    a = extract_mesh(sdf, BOUND, resolution, coarse=1, progress=False)
    b = extract_mesh(sdf, BOUND, resolution, coarse=4, progress=False)
    assert np.array_equal(a.faces, b.faces) and np.allclose(a.vertices, b.vertices, atol=1e-6)
