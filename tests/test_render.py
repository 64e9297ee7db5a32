"""data_prep.render_views / render_io / procedural: Blender renders follow nova3d.data.schema.

The fast tier shares one tiny render (2 objects, 4 views, 32 px) across tests and renders at
most a handful of other tiny objects; everything else runs without Blender.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from torchvision.io import ImageReadMode, decode_png

from data_prep import procedural
from data_prep.render_io import (ATTEMPTS_FILE, BACKGROUNDS, FAILURES_FILE, MAX_ATTEMPTS, RenderSettings,
                                 collect_sources, object_cameras, write_view_files)
from nova3d.cameras import Cameras, OrbitSpec, convert_normal_frame, decode_normals, orbit_cameras
from nova3d.data import schema
from nova3d.data.png import encode_png16
from nova3d.errors import Nova3DError

TINY = RenderSettings(views=4, resolution=32, samples=2, depth=True)  # denoiser on: the default path
OBJECTS = ["mug", "crate"]  # vertex colours; UV image texture


def _png(path: Path) -> np.ndarray:
    """Any PNG as [H, W, C] with its bit depth kept (PIL cannot read 16-bit RGB)."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return decode_png(data, mode=ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, object]:
    from data_prep.render_views import render_objects

    out = tmp_path_factory.mktemp("renders")
    summary = render_objects(collect_sources([], OBJECTS), out, TINY, progress=False)
    return out, summary


# --- with Blender ----------------------------------------------------------------------------

def test_object_folders_follow_the_schema(rendered) -> None:
    out, summary = rendered
    assert summary.rendered == OBJECTS and not summary.failed and summary.exit_code == 0
    for name in OBJECTS:
        assert schema.missing_files(out / name) == []
        expected = [schema.CAMERAS_FILE, schema.META_FILE, schema.RGB_DIR, schema.NORMAL_DIR, schema.MASK_DIR,
                    schema.DEPTH_DIR]  # nothing else: no scratch passes, logs or exported sources left
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(expected)
    assert not list(out.glob(f"*{schema.TMP_SUFFIX}")) and not (out / FAILURES_FILE).exists()


def test_images_have_the_schema_formats(rendered) -> None:
    out, _ = rendered
    for name in OBJECTS:
        for i in range(TINY.views):
            view = schema.view_name(i)
            rgb = Image.open(out / name / schema.RGB_DIR / view)
            assert rgb.mode == "RGBA" and rgb.size == (32, 32)
            mask = Image.open(out / name / schema.MASK_DIR / view)
            assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
            assert np.array_equal(np.asarray(mask) == 255, np.asarray(rgb)[..., 3] >= 128)
            normal, depth = _png(out / name / schema.NORMAL_DIR / view), _png(out / name / schema.DEPTH_DIR / view)
            assert normal.shape == (32, 32, 3) and normal.dtype == np.uint16
            assert depth.shape == (32, 32, 1) and depth.dtype == np.uint16
            fg = np.asarray(mask) == 255
            assert fg.mean() > 0.1  # the object is in view
            d = depth[..., 0] / schema.DEPTH_SCALE
            assert (d[~fg] == 0).all() and ((d[fg] > 0.5) & (d[fg] < 1.5)).mean() > 0.8  # radius 1.5, unit box
            assert (d[fg] == 0).sum() == (d[fg] <= 0.5).sum()  # edge pixels whose samples missed: 0 = none


def test_normals_are_unit_and_face_their_camera(rendered) -> None:
    out, _ = rendered
    for name in OBJECTS:
        cams = Cameras.load(out / name / schema.CAMERAS_FILE)
        assert cams.normal_frame == "input_view" and cams.input_view == 0
        raw = np.stack([_png(out / name / schema.NORMAL_DIR / schema.view_name(i)) for i in range(len(cams))])
        n = raw.astype(np.float64) / 65535 * 2 - 1
        fg = np.stack([np.asarray(Image.open(out / name / schema.MASK_DIR / schema.view_name(i))) == 255
                       for i in range(len(cams))])
        assert np.abs(np.linalg.norm(n[fg], axis=-1) - 1).max() < 1e-3
        # Back in each view's own frame, visible surfaces point towards that camera (+z).
        own = convert_normal_frame(decode_normals(torch.from_numpy(raw / 65535.0)), cams.c2w.double(),
                                   "input_view", "view")
        assert (own[torch.from_numpy(fg)][:, 2] > 0).float().mean() > 0.95


def test_meta_and_cameras_json(rendered) -> None:
    out, _ = rendered
    for name in OBJECTS:
        meta = schema.ObjectMeta.load(out / name / schema.META_FILE)
        assert (meta.object_id, meta.source, meta.num_views, meta.resolution, meta.has_depth) == \
            (name, f"procedural:{name}", 4, 32, True)
        assert meta.renderer["name"] == "blender-cycles" and meta.renderer["version"].startswith("4.2")
        assert meta.renderer["samples"] == 2 and meta.renderer["device"] in ("CPU", "OPTIX", "CUDA", "HIP")
        assert meta.settings["fov_deg"] == 49.1 and meta.settings["radius"] == 1.5
        # The normalisation maps the procedural mesh into the unit box centred at the origin.
        v = (procedural.make_object(name).vertices + meta.normalisation["offset"]) * meta.normalisation["scale"]
        assert np.isclose((v.max(0) - v.min(0)).max(), 1, atol=1e-5)
        assert np.allclose((v.max(0) + v.min(0)) / 2, 0, atol=1e-6)
        cams = Cameras.load(out / name / schema.CAMERAS_FILE)
        expected = orbit_cameras(OrbitSpec(num_views=4, resolution=32))
        assert torch.allclose(cams.c2w, expected.c2w, atol=1e-6) and torch.allclose(cams.K, expected.K)


def test_colours_come_through(rendered) -> None:
    out, _ = rendered
    mug = np.asarray(Image.open(out / "mug" / schema.RGB_DIR / "000.png")).astype(int)
    body = mug[mug[..., 3] == 255][:, :3]
    assert (body[:, 2] > body[:, 0] + 40).mean() > 0.6  # vertex colours: a blue mug
    crate = np.asarray(Image.open(out / "crate" / schema.RGB_DIR / "000.png")).astype(int)[..., :3]
    wood = (crate[..., 0] > crate[..., 2] + 20).mean()
    blue_f = (crate[..., 2] > crate[..., 0] + 40).mean()  # image texture: the 'F' on the front
    assert wood > 0.3 and blue_f > 0.05


def test_rerun_skips_finished_objects(rendered) -> None:
    from data_prep.render_views import render_objects

    out, _ = rendered
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = render_objects(collect_sources([], OBJECTS), out, TINY, progress=False)
    assert again.skipped == OBJECTS and again.rendered == [] and again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    limited = render_objects(collect_sources([], OBJECTS), out, replace(TINY, limit=1), progress=False)
    assert limited.skipped == OBJECTS[:1]


def test_interrupted_object_is_redone(rendered, tmp_path: Path) -> None:
    from data_prep.render_views import render_objects

    out, _ = rendered
    run = tmp_path / "run"
    run.mkdir()
    (run / "mug").symlink_to(out / "mug", target_is_directory=True)  # finished earlier
    partial = run / f"crate{schema.TMP_SUFFIX}"
    (partial / schema.RGB_DIR).mkdir(parents=True)
    (partial / schema.RGB_DIR / "000.png").write_bytes(b"half a png")
    summary = render_objects(collect_sources([], OBJECTS), run, TINY, progress=False)
    assert summary.skipped == ["mug"] and summary.rendered == ["crate"]
    assert not partial.exists() and schema.missing_files(run / "crate") == []


def test_bad_meshes_are_listed_and_counted(tmp_path: Path, capsys) -> None:
    from data_prep.render_views import main

    meshes = tmp_path / "meshes"
    (meshes / "sub").mkdir(parents=True)
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.25))
    box.export(meshes / "box.obj")
    box.export(meshes / "sub" / "box.stl")  # same stem in a subfolder: gets its own id
    (meshes / "garbage.glb").write_bytes(b"definitely not a glb" * 8)
    (meshes / "empty.ply").write_bytes(b"")
    (meshes / "notes.txt").write_text("not a mesh")  # ignored in a folder...
    (meshes / "quad.obj").write_text("mtllib quad.mtl\nv 0 0 0\nv 1 0 0\nv 1 0 1\nvt 0 0\nvt 1 0\nvt 1 1\n"
                                     "usemtl m\nf 1/1 2/2 3/3\n")
    (meshes / "quad.mtl").write_text("newmtl m\nmap_Kd missing.png\n")  # would render magenta
    unsupported = tmp_path / "model.blend"
    unsupported.write_bytes(b"BLENDER")  # ...but named explicitly: a failure
    out = tmp_path / "out"
    code = main([str(meshes), str(unsupported), "--out", str(out), "--views", "2", "--resolution", "16",
                 "--samples", "1", "--no-denoise"])
    records = [json.loads(line) for line in (out / FAILURES_FILE).read_text().splitlines()]
    assert code == 1 and len(records) == 4  # 1: some objects failed, the others rendered
    reasons = {r["object"]: r["reason"] for r in records}
    assert set(reasons) == {"garbage", "empty", "model", "quad"}
    assert "empty file" in reasons["empty"] and "unsupported format .blend" in reasons["model"]
    assert "import failed" in reasons["garbage"] and "missing.png' cannot be loaded" in reasons["quad"]
    assert (out / "logs" / "quad.log").is_file()  # Blender's output of a failed object is kept
    done = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "logs")
    assert len(done) == 2 and done[0] == "box" and done[1].startswith("box_")
    assert "rendered 2" in capsys.readouterr().out
    # A re-run retries the failures (the files may have been fixed) without repeating their records.
    assert main([str(meshes), str(unsupported), "--out", str(out)]) == 1
    assert len((out / FAILURES_FILE).read_text().splitlines()) == 4


def test_object_that_keeps_killing_the_run_is_given_up(tmp_path: Path) -> None:
    from data_prep.render_views import render_objects

    partial = tmp_path / f"mug{schema.TMP_SUFFIX}"
    partial.mkdir()
    (partial / ATTEMPTS_FILE).write_text(str(MAX_ATTEMPTS))  # as left by runs that crashed on it
    summary = render_objects(collect_sources([], ["mug"]), tmp_path, TINY, progress=False)
    assert summary.exit_code == 1 and "Blender crash" in summary.failed[0]["reason"]
    assert partial.is_dir() and not (tmp_path / "mug").exists()  # kept: the next run gives up too


@pytest.mark.parametrize("argv, message", [
    (["/no/such/mesh.glb"], "input not found: /no/such/mesh.glb"),
    ([], "nothing to render"),
    (["--procedural", "teapot"], "unknown procedural object 'teapot'"),
    (["--procedural", "mug", "--elevation", "0", "10"], "--elevation takes 1 value or one per view"),
])
def test_bad_cli_input_is_one_clear_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    from data_prep.render_views import main

    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("render_views: error: ") and message in err


def test_unwritable_output_dir_via_the_module_entry(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "data_prep.render_views", "--procedural", "mug",
                             "--out", str(blocker / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "which is a file, not a folder" in result.stderr


# --- without Blender ----------------------------------------------------------------------

def test_collect_sources_and_random_azimuth(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for rel in ("a/chair.glb", "chair.ply", "a/readme.md"):
        (tmp_path / rel).write_bytes(b"x")
    sources = collect_sources([str(tmp_path)], ["mug"])  # recursive, sorted, only mesh suffixes
    ids = [s.object_id for s in sources]
    assert ids[0] == "chair" and ids[1].startswith("chair_") and ids[2] == "mug"
    assert sources[0].path == tmp_path / "a" / "chair.glb" and sources[2].source == "procedural:mug"
    with pytest.raises(Nova3DError, match="input not found"):
        collect_sources([str(tmp_path / "missing")])
    settings = RenderSettings(random_azimuth=True, seed=3)
    a, b = object_cameras(settings, "obj_a"), object_cameras(settings, "obj_b")
    assert a.extra["start_azimuth_deg"] == object_cameras(settings, "obj_a").extra["start_azimuth_deg"]
    assert a.extra["start_azimuth_deg"] != b.extra["start_azimuth_deg"]
    assert 0 <= float(a.azimuth_deg[0]) < 360 and object_cameras(RenderSettings(), "x").extra["start_azimuth_deg"] == 0


def test_write_view_files_converts_normals_and_backgrounds(tmp_path: Path) -> None:
    cams = orbit_cameras(OrbitSpec(num_views=2, resolution=4))
    (tmp_path / schema.RGB_DIR).mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[1:3, 1:3] = [200, 100, 50, 255]
    rgba[0, 0] = [200, 100, 50, 64]  # a quarter-covered edge pixel: below the mask threshold
    for i in range(2):
        Image.fromarray(rgba, "RGBA").save(tmp_path / schema.RGB_DIR / schema.view_name(i))
    normals = np.zeros((2, 4, 4, 3), np.float32)
    normals[:, 1:3, 1:3] = cams.c2w[:, None, None, :3, 2].numpy() * 0.5  # facing each camera, unnormalised
    depth = np.full((2, 4, 4), 1e10, np.float32)
    depth[:, 1:3, 1:3] = 1.25
    write_view_files(tmp_path, cams, normals, depth, background="white")
    stored = decode_normals(torch.from_numpy(_png(tmp_path / schema.NORMAL_DIR / "001.png") / 65535.0))
    expected = convert_normal_frame(cams.c2w[:, None, :3, 2], cams.c2w, "world", "input_view")[1, 0]
    assert torch.allclose(stored[1, 1], expected.double(), atol=1e-4)
    assert (_png(tmp_path / schema.NORMAL_DIR / "001.png")[0, 0] == 32768).all()  # background: encoded 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / schema.MASK_DIR / "000.png")) == 255,
                          rgba[..., 3] == 255)
    d = _png(tmp_path / schema.DEPTH_DIR / "000.png")[..., 0]
    assert d[1, 1] == 12500 and d[0, 0] == 0
    out = np.asarray(Image.open(tmp_path / schema.RGB_DIR / "000.png"))
    assert tuple(out[0, 1]) == (255, 255, 255, 0) and tuple(out[1, 1]) == (200, 100, 50, 255)
    assert set(BACKGROUNDS) >= {"transparent", "white"}


def test_encode_png16_round_trip() -> None:
    image = np.random.default_rng(0).integers(0, 65536, (9, 7, 3)).astype(np.uint16)
    data = torch.frombuffer(bytearray(encode_png16(image)), dtype=torch.uint8)
    assert np.array_equal(decode_png(data, mode=ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy(), image)


def test_procedural_objects_are_varied_and_deterministic(tmp_path: Path) -> None:
    assert len(procedural.PROCEDURAL_OBJECTS) >= 8
    textured = 0
    for name in procedural.PROCEDURAL_OBJECTS:
        mesh = procedural.make_object(name)
        again = procedural.make_object(name)
        assert len(mesh.faces) > 0 and np.array_equal(mesh.vertices, again.vertices)
        assert np.array_equal(mesh.faces, again.faces)
        if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
            textured += 1
            assert mesh.visual.uv.shape == (len(mesh.vertices), 2) and mesh.visual.material.image is not None
        else:
            assert len(np.unique(mesh.visual.vertex_colors[:, :3], axis=0)) >= 2  # multi-coloured
    assert textured >= 1
    with pytest.raises(KeyError, match="unknown procedural object"):
        procedural.make_object("teapot")


def test_export_object_keeps_colours_and_orientation(tmp_path: Path) -> None:
    glb = procedural.export_object("mug", tmp_path / "mug.glb")
    loaded = trimesh.load(glb, force="mesh")
    # glTF is Y-up: Blender's Z (the mug's height, 0.9) becomes Y in the file.
    assert np.isclose(loaded.extents[1], 0.9, atol=1e-3) and loaded.visual.kind == "vertex"
    crate = trimesh.load(procedural.export_object("crate", tmp_path / "crate.glb"), force="mesh")
    assert crate.visual.uv is not None and crate.visual.material.baseColorTexture is not None
    # Blender multiplies baseColorFactor into the texture: it must be white, not trimesh's 0.4 grey.
    assert np.array_equal(crate.visual.material.baseColorFactor, [255, 255, 255, 255])
    ply = trimesh.load(procedural.export_object("chair", tmp_path / "chair.ply"))
    assert np.isclose(ply.extents[2], 1.0) and len(np.unique(ply.visual.vertex_colors, axis=0)) >= 3
    with pytest.raises(ValueError, match="use .glb"):
        procedural.export_object("mug", tmp_path / "mug.usd")


def test_solid_objects_are_closed_surfaces_without_contact_faces() -> None:
    for name in procedural.PROCEDURAL_OBJECTS:
        parts, solid = procedural.make_object(name), procedural.solid_object(name)
        assert solid.is_watertight and np.allclose(solid.bounds, parts.bounds, atol=1e-6), name
        assert solid.area <= parts.area + 1e-9, name  # only faces inside the solid go
    # block_tower's blocks rest on each other: the union keeps their total volume and loses the
    # faces where they touch (twice the area of each contact), so the area falls by a fifth.
    tower, blocks = procedural.make_object("block_tower"), procedural.object_parts("block_tower")
    assert len(blocks) == 5 and all(block.is_volume for block in blocks)
    solid = procedural.solid_object("block_tower")
    assert np.isclose(solid.volume, sum(b.volume for b in blocks), rtol=1e-6)
    assert solid.area < 0.85 * tower.area
