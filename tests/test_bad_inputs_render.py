"""Bad input to the renderer and to the cameras.json readers (issue 16): one clear line naming the
file and the problem, a non-zero exit that tells "unusable input" (2) from "some objects failed" (1),
and nothing half-written.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import trimesh

from data_prep.blender_scene import MeshError, check_finite_vertices
from data_prep.render_io import FAILURES_FILE
from helpers_objects import make_object_folder
from nova3d.cameras import Cameras, CamerasFileError
from nova3d.data import schema
from nova3d.data.sample_error import SampleError
from nova3d.data.shards import read_object_folder
from nova3d.errors import Nova3DError
from nova3d.mesh_io import nonfinite_vertices

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RENDER = ["--views", "2", "--resolution", "16", "--samples", "1", "--no-denoise"]


def _nan_obj(path: Path) -> Path:
    path.write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 2 3 4\nf 1 2 4\n")
    return path


def _inf_glb(path: Path) -> Path:
    box = trimesh.creation.box()
    verts = box.vertices.copy()
    verts[0, 2] = np.inf
    box.vertices = verts
    with warnings.catch_warnings():  # trimesh's normals of an inf vertex
        warnings.simplefilter("ignore", RuntimeWarning)
        box.export(path)
    return path


# --- NaN/inf mesh vertices (Blender's importers would read them as 0) -------------------------

def test_nonfinite_vertices_are_counted_in_the_file(tmp_path: Path) -> None:
    assert nonfinite_vertices(_nan_obj(tmp_path / "nan.obj")) == (1, 4)
    assert nonfinite_vertices(_inf_glb(tmp_path / "inf.glb")) == (1, 8)
    trimesh.creation.box().export(tmp_path / "box.ply")
    assert nonfinite_vertices(tmp_path / "box.ply") == (0, 8)


def test_nonfinite_mesh_is_refused_before_blender_imports_it(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match=r"^nan\.obj: 1 of 4 vertices have non-finite coordinates \(NaN/inf\)$"):
        check_finite_vertices(_nan_obj(tmp_path / "nan.obj"))
    with pytest.raises(MeshError, match=r"^inf\.glb: 1 of 8 vertices"):
        check_finite_vertices(_inf_glb(tmp_path / "inf.glb"))
    (tmp_path / "garbage.glb").write_bytes(b"not a glb")
    check_finite_vertices(tmp_path / "garbage.glb")  # unreadable to trimesh: Blender's importer reports it


def test_nonfinite_meshes_fail_on_the_terminal_and_exit_1(tmp_path: Path, capsys) -> None:
    from data_prep.render_views import main

    meshes = tmp_path / "meshes"
    meshes.mkdir()
    _nan_obj(meshes / "nan.obj")
    _inf_glb(meshes / "inf.glb")
    trimesh.creation.box().export(meshes / "box.obj")
    out = tmp_path / "out"
    assert main([str(meshes), "--out", str(out), *RENDER]) == 1  # some failed, the others rendered
    reasons = {r["object"]: r["reason"] for r in map(json.loads, (out / FAILURES_FILE).read_text().splitlines())}
    assert reasons == {"nan": "nan.obj: 1 of 4 vertices have non-finite coordinates (NaN/inf)",
                       "inf": "inf.glb: 1 of 8 vertices have non-finite coordinates (NaN/inf)"}
    err = capsys.readouterr().err.splitlines()
    for object_id, reason in reasons.items():  # one line each, on stderr
        assert f"failed {object_id}: {reason}" in err
    assert err[-1].startswith("render_views: error: 2 of 3 object(s) failed (first: ") and FAILURES_FILE in err[-1]
    assert schema.missing_files(out / "box") == []
    assert not (out / "nan").exists() and not (out / "inf").exists()
    assert not list(out.glob(f"*{schema.TMP_SUFFIX}"))


# --- exit status 2: unusable input, nothing written -----------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["/no/such/mesh.glb"], "input not found: /no/such/mesh.glb"),
    (["--procedural", "mug", "--views", "0"], "--views must be >= 1, got 0"),
    (["--procedural", "mug", "--resolution", "0"], "--resolution must be >= 8, got 0"),
])
def test_unusable_input_exits_2_and_writes_nothing(tmp_path: Path, capsys, argv, message) -> None:
    from data_prep.render_views import main

    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("render_views: error: ") and message in err
    assert not out.exists()


def test_a_resumed_render_with_other_settings_redoes_the_stale_objects(tmp_path: Path, capsys) -> None:
    """issue 25: a resumed run with another --resolution kept the old renders and said "kept"."""
    from data_prep.render_views import main

    out = tmp_path / "out"
    assert main(["--procedural", "mug", "--out", str(out), *RENDER]) == 0
    capsys.readouterr()
    again = [a if a != "16" else "24" for a in RENDER]
    assert main(["--procedural", "mug", "--out", str(out), *again]) == 0
    captured = capsys.readouterr()
    assert "re-rendering mug: its render has other settings (--resolution 16 -> 24)" in captured.err
    assert "1 re-rendered: settings changed" in captured.out
    assert json.loads((out / "mug" / schema.META_FILE).read_text())["resolution"] == 24
    assert not list(out.glob("*.old")) and not list(out.glob(f"*{schema.TMP_SUFFIX}"))
    assert main(["--procedural", "mug", "--out", str(out), *again]) == 0  # now current: skipped
    assert "skipped 1 (already done)" in capsys.readouterr().out


def test_output_that_is_a_file_exits_2_before_blender(tmp_path: Path, capsys) -> None:
    from data_prep.render_views import main

    (tmp_path / "f").write_text("x")
    assert main(["--procedural", "mug", "--out", str(tmp_path / "f" / "out"), *RENDER]) == 2
    assert "is inside" in capsys.readouterr().err


def test_missing_gpu_exits_2_without_creating_the_output(tmp_path: Path, capsys, monkeypatch) -> None:
    from data_prep import render_views

    monkeypatch.setattr(render_views, "find_gpu_backend", lambda: None)
    out = tmp_path / "out"
    assert render_views.main(["--procedural", "mug", "--device", "gpu", "--out", str(out)]) == 2
    assert "--device gpu: Cycles finds no GPU" in capsys.readouterr().err and not out.exists()


def test_bad_arguments_exit_2_too(tmp_path: Path) -> None:
    from data_prep.render_views import main

    with pytest.raises(SystemExit) as exit_:
        main(["--procedural", "mug", "--views", "many", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and not (tmp_path / "out").exists()


# --- cameras.json: one check for every reader -----------------------------------------------

def _set(view: int, key: str, value):
    def edit(data: dict) -> dict:
        data["frames"][view][key] = value
        return data
    return edit


_POSE = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.5]]
BAD_CAMERAS = [
    (lambda d: [], "expected a JSON object, got a list"),
    (lambda d: [1, 2, 3], "expected a JSON object, got a list"),
    (lambda d: "x", "expected a JSON object, got a string"),
    (lambda d: {**d, "frames": {}}, "'frames' must be a non-empty list of views, got an object"),
    (_set(2, "c2w", _POSE), "view 2: c2w is 3x4, expected 4x4"),
    (_set(1, "c2w", [row[:] for row in _POSE] + [[0, 0, 0, float("nan")]]), "view 1: c2w has NaN/inf entries"),
    (_set(3, "c2w", _POSE + [[0, 0, 1, 1]]), "view 3: c2w last row is [0.0, 0.0, 1.0, 1.0], expected [0, 0, 0, 1]"),
    (_set(0, "K", [[1, 0, 0], [0, 1, 0]]), "view 0: K is 2x3, expected 3x3"),
    (_set(0, "c2w", [[1, 2], [3]]), "view 0: c2w is not a matrix of numbers"),
]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_object_folder(tmp_path, "obj", views=4, res=24)


def _break_cameras(folder: Path, edit) -> Path:
    path = folder / schema.CAMERAS_FILE
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))  # NaN is written as JSON's NaN
    return path


@pytest.mark.parametrize("edit, message", BAD_CAMERAS)
def test_bad_cameras_json_names_the_file_and_view(folder: Path, edit, message: str) -> None:
    path = _break_cameras(folder, edit)
    with pytest.raises(CamerasFileError) as err:
        Cameras.load(path)
    assert isinstance(err.value, Nova3DError) and isinstance(err.value, ValueError)  # CLIs: one line
    assert str(err.value) == f"{path}: not a valid cameras.json ({message})"
    with pytest.raises(SampleError) as err:  # the object-folder reader (write_shards, fusion)
        read_object_folder(folder)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("edit, message", [BAD_CAMERAS[0], BAD_CAMERAS[4], BAD_CAMERAS[6]])
def test_fuse_refuses_bad_cameras_before_fitting(folder: Path, tmp_path: Path, capsys, edit, message) -> None:
    from nova3d.cli import main as cli_main

    path = _break_cameras(folder, edit)
    out = tmp_path / "out"
    args = ["optim.steps=2", "logging.tensorboard=false", "logging.progress=false"]  # should the check fail
    assert cli_main(["fuse", "--views", str(folder), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and message in err[0]
    assert not out.exists()


def test_write_shards_rejects_the_object_with_bad_cameras(folder: Path, tmp_path: Path) -> None:
    from data_prep.write_shards import write_shards

    make_object_folder(folder.parent, "good", views=4, res=24)
    path = _break_cameras(folder, BAD_CAMERAS[4][0])
    summary = write_shards(folder.parent, tmp_path / "shards", progress=False)
    [rejected] = summary.rejected
    assert rejected.object_id == "obj" and str(path) in rejected.detail and "view 2: c2w is 3x4" in rejected.detail
    assert summary.num_samples == 1
