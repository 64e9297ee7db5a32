"""Offline tests for data_prep/objaverse_lvis.py: meshes are made here with trimesh; the
objaverse network calls are replaced by monkeypatched fakes."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import numpy as np
import objaverse
import pytest
import trimesh

from data_prep import objaverse_lvis as ol
from data_prep.objaverse_lvis import ObjectListError, ObjectRecord


@pytest.fixture()
def meshes(tmp_path: Path) -> dict[str, str]:
    """uid -> path of small meshes covering every filter outcome."""
    d = tmp_path / "glbs"
    d.mkdir()
    made: dict[str, trimesh.Trimesh | trimesh.Scene | bytes] = {
        "box": trimesh.creation.box(extents=[1.0, 2.0, 3.0]),
        "plane": trimesh.creation.box(extents=[1.0, 1.0, 0.0]),  # flat: an extent is 0
        "needle": trimesh.creation.box(extents=[1.0, 0.001, 0.002]),
        "tri": trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 1]], [[0, 1, 2]]),
        "sphere": trimesh.creation.icosphere(subdivisions=2),  # 162 vertices
        "points": trimesh.PointCloud(np.random.default_rng(0).random((20, 3))),
        "garbage": b"definitely not a glb" * 4,
        "zero": b"",
    }
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(), transform=trimesh.transformations.translation_matrix([4, 0, 0]))
    scene.add_geometry(trimesh.creation.box())
    made["scene"] = scene
    paths = {}
    for uid, obj in made.items():
        path = d / f"{uid}.glb"
        if isinstance(obj, bytes):
            path.write_bytes(obj)
        else:
            obj.export(path)
        paths[uid] = str(path)
    return paths


def _records(paths: dict[str, str]) -> list[ObjectRecord]:
    return [ObjectRecord(uid=u, category="thing", path=p) for u, p in paths.items()]


def _by_uid(records: list[ObjectRecord]) -> dict[str, ObjectRecord]:
    return {r.uid: r for r in records}


def test_filter_reasons(meshes: dict[str, str], tmp_path: Path) -> None:
    recs = _records(meshes) + [
        ObjectRecord(uid="nopath", category="thing"),
        ObjectRecord(uid="gone", category="thing", path=str(tmp_path / "gone.glb")),
    ]
    out = _by_uid(ol.filter_objects(recs, min_vertices=4, max_vertices=100, min_extent_ratio=0.01, progress=False))
    assert len(out) == len(recs)
    expected = {
        "box": None, "scene": None, "plane": "degenerate_bbox", "needle": "thin_bbox",
        "tri": "too_few_vertices", "sphere": "too_many_vertices", "points": "empty_mesh",
        "garbage": "unreadable", "zero": "unreadable", "nopath": "no_path", "gone": "missing_file",
    }
    for uid, reason in expected.items():
        rec = out[uid]
        assert rec.reason == reason, (uid, rec)
        assert rec.status == (ol.OK if reason is None else ol.REJECTED)
        assert (rec.detail is None) == (reason is None)
        assert reason is None or reason in ol.REASONS
    assert out["box"].vertices == 8 and np.allclose(out["box"].extents, [1, 2, 3])
    # a scene's meshes are concatenated with their node transforms
    assert out["scene"].vertices == 16 and np.allclose(out["scene"].extents, [5, 1, 1])
    assert ol.summarize(out.values())["ok"] == 2


def test_failed_renders_file_and_sticky_rejections(meshes: dict[str, str], tmp_path: Path) -> None:
    kw = dict(min_vertices=4, max_vertices=100, progress=False)
    first = ol.filter_objects(_records(meshes), **kw)
    failures = tmp_path / "failures.jsonl"
    failures.write_text(
        json.dumps({"object": meshes["box"], "reason": "blender crashed"}) + "\n\n"
        + json.dumps({"uid": "plane", "reason": "empty render"}) + "\n"
    )
    second = _by_uid(ol.filter_objects(first, failed_renders=failures, **kw))
    assert (second["box"].reason, second["box"].detail) == ("failed_render", "blender crashed")
    # an earlier rejection keeps its own reason; the others are untouched
    assert second["plane"].reason == "degenerate_bbox"
    assert second["scene"].status == ol.OK
    # sticky: a later pass without the failures file does not resurrect the box ...
    assert _by_uid(ol.filter_objects(list(second.values()), **kw))["box"].reason == "failed_render"
    # ... unless asked to re-evaluate
    assert _by_uid(ol.filter_objects(list(second.values()), recheck=True, **kw))["box"].status == ol.OK


def test_failed_renders_set_matches_uid_path_or_stem(meshes: dict[str, str]) -> None:
    recs = _records({k: meshes[k] for k in ("box", "scene", "sphere")})
    # a relative path whose stem is the uid, a uid, and an absolute path
    failed = {"some/other/dir/box.glb", "scene", os.path.abspath(meshes["sphere"])}
    out = ol.filter_objects(recs, min_vertices=4, failed_renders=failed, progress=False)
    assert [r.reason for r in out] == ["failed_render"] * 3


def test_object_list_round_trip(tmp_path: Path) -> None:
    recs = [
        ObjectRecord(uid="a", category="chair", path="/x/a.glb", status="ok", vertices=10, extents=(1.0, 2.0, 3.0)),
        ObjectRecord(uid="b", category="rug", status="rejected", reason="no_path", detail="x",
                     extra={"source": "objaverse"}),
        ObjectRecord(uid="c"),
    ]
    path = tmp_path / "sub" / "objects.jsonl"
    ol.write_object_list(path, recs)
    lines = path.read_text().splitlines()
    assert json.loads(lines[2]) == {"uid": "c"}  # None fields are omitted
    assert json.loads(lines[1])["source"] == "objaverse"
    back = ol.read_object_list(path)
    assert back == recs and back[1].extra == {"source": "objaverse"}


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "objects.jsonl"
    ol.write_object_list(path, [ObjectRecord(uid="old")])

    def bad_records():
        yield ObjectRecord(uid="new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        ol.write_object_list(path, bad_records())
    assert [r.uid for r in ol.read_object_list(path)] == ["old"]  # old content intact
    assert os.listdir(tmp_path) == ["objects.jsonl"]  # no temp file left behind

    replaced = []
    monkeypatch.setattr(ol.os, "replace", lambda src, dst: replaced.append((src, dst)) or os.rename(src, dst))
    ol.write_object_list(path, [ObjectRecord(uid="new")])
    (src, dst), = replaced
    assert Path(src).parent == tmp_path and Path(dst) == path and src != str(path)
    assert [r.uid for r in ol.read_object_list(path)] == ["new"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"uid": "a"}\n{"uid": "b"\n', "objects.jsonl:2: malformed JSON"),
        ('{"category": "x"}\n', "objects.jsonl:1: missing or non-string 'uid'"),
        ('["a"]\n', "objects.jsonl:1: expected a JSON object"),
        ('{"uid": "a"}\n{"uid": "a"}\n', "objects.jsonl:2: duplicate uid 'a'"),
        ('{"uid": "a", "status": "maybe"}\n', "unknown status"),
        ('{"uid": "a", "extents": [1, 2]}\n', "'extents' must be a list of 3 numbers"),
    ],
)
def test_read_rejects_bad_lines(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "objects.jsonl"
    path.write_text(content)
    with pytest.raises(ObjectListError, match=re.escape(problem)):
        ol.read_object_list(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ObjectListError, match="nope.jsonl: no such file"):
        ol.read_object_list(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("n, tasks", [(0, 3), (1, 4), (10, 1), (10, 3), (17, 5), (5, 8)])
def test_shard_slice_disjoint_and_covering(n: int, tasks: int) -> None:
    items = [f"u{i}" for i in range(n)]
    slices = [ol.shard_slice(items, t, tasks) for t in range(tasks)]
    flat = [x for s in slices for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert slices == [ol.shard_slice(items, t, tasks) for t in range(tasks)]  # deterministic


@pytest.mark.parametrize("task_id, tasks", [(3, 3), (-1, 3), (0, 0)])
def test_shard_slice_bad_args(task_id: int, tasks: int) -> None:
    with pytest.raises(ValueError):
        ol.shard_slice([1, 2, 3], task_id, tasks)


FAKE_LVIS = {
    "chair": [f"c{i:02d}" for i in range(20)],
    "mug": ["m2", "m1", "m0"],
    "rug": ["r0", "m0"],  # m0 is also a mug: it must appear once
}


def test_list_lvis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objaverse, "load_lvis_annotations", lambda: FAKE_LVIS)
    recs = ol.list_lvis()
    assert [r.uid for r in recs if r.category == "mug"] == ["m0", "m1", "m2"]
    assert [r.uid for r in recs if r.category == "rug"] == ["r0"]
    assert len(recs) == len({r.uid for r in recs}) == 24

    sample = ol.list_lvis(max_per_category=5, seed=1)
    chairs = [r.uid for r in sample if r.category == "chair"]
    assert len(chairs) == 5 and chairs == sorted(chairs) and set(chairs) <= set(FAKE_LVIS["chair"])
    assert sample == ol.list_lvis(max_per_category=5, seed=1)  # deterministic
    assert chairs != [r.uid for r in ol.list_lvis(max_per_category=5, seed=2) if r.category == "chair"]
    # a category's sample does not depend on which other categories are listed
    assert [r.uid for r in ol.list_lvis(["chair"], max_per_category=5, seed=1)] == chairs
    assert [r.uid for r in ol.list_lvis(["rug"])] == ["r0"]  # m0 stays the mug's

    with pytest.raises(ValueError, match="unknown LVIS category 'chiar'.*chair"):
        ol.list_lvis(["chiar"])


def test_download_fills_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_objects(uids: list[str], download_processes: int = 1) -> dict[str, str]:
        calls.append((list(uids), download_processes))
        return {u: f"/cache/{u}.glb" for u in uids if u != "missing"}

    monkeypatch.setattr(objaverse, "load_objects", fake_load_objects)
    recs = [ObjectRecord(uid="a", category="chair"), ObjectRecord(uid="missing", category="mug")]
    out = ol.download(recs, processes=3)
    assert calls == [(["a", "missing"], 3)]
    assert [(r.uid, r.category, r.path) for r in out] == [("a", "chair", "/cache/a.glb"), ("missing", "mug", None)]


def test_cli_list_filter_paths(meshes: dict[str, str], tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(objaverse, "load_lvis_annotations", lambda: FAKE_LVIS)
    objects = tmp_path / "objects.jsonl"
    ol.main(["list", "-o", str(objects), "--categories", "mug", "rug", "--max-per-category", "2"])
    assert [r.category for r in ol.read_object_list(objects)] == ["mug", "mug", "rug"]

    ol.write_object_list(objects, _records(meshes))
    failures = tmp_path / "failures.jsonl"
    failures.write_text(json.dumps({"object": meshes["scene"], "reason": "timeout"}) + "\n")
    ol.main(["filter", str(objects), "--min-vertices", "4", "--max-vertices", "1000",
             "--failed-renders", str(failures), "--no-progress"])
    ok = {r.uid for r in ol.read_object_list(objects) if r.status == ol.OK}
    assert ok == {"box", "sphere"}
    assert "ok=2" in capsys.readouterr().err

    capsys.readouterr()
    printed = []
    for task in range(2):
        ol.main(["paths", str(objects), "--task-id", str(task), "--num-tasks", "2"])
        printed += capsys.readouterr().out.split()
    assert sorted(printed) == sorted([meshes["box"], meshes["sphere"]])


@pytest.mark.parametrize("argv_tail, problem", [
    (["filter", "{d}/nope.jsonl"], "nope.jsonl: no such file"),
    (["filter", "{d}/bad.jsonl"], "bad.jsonl:1: malformed JSON"),
    (["filter", "{d}/ok.jsonl", "--failed-renders", "{d}/nope.jsonl"], "nope.jsonl: no such file"),
    (["paths", "{d}/ok.jsonl", "--task-id", "5", "--num-tasks", "2"], "task_id must be in [0, 2)"),
])
def test_cli_bad_input_exits_with_one_line(tmp_path: Path, argv_tail: list[str], problem: str) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "ok.jsonl").write_text('{"uid": "a"}\n')
    with pytest.raises(SystemExit) as exc:
        ol.main([a.format(d=tmp_path) for a in argv_tail])
    msg = str(exc.value.code)
    assert msg.startswith("error: ") and problem in msg and "\n" not in msg


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        ol.main(["filter", "--help"])
    assert exc.value.code == 0
    assert "--failed-renders" in capsys.readouterr().out


def test_cli_module_error_has_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep.objaverse_lvis", "filter", str(tmp_path / "nope.jsonl")],
        cwd=root, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file"]
