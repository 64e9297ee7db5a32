"""Result folders are staged: a failed or killed command leaves an earlier result exactly as it was
(nova3d.atomic), and a rerun replaces only what nova3d wrote."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nova3d.atomic import (MARKER, OLD_SUFFIX, PARTIAL_SUFFIX, check_replaceable, check_writable, moved_paths,
                           staged_dir, staged_entries)
from nova3d.errors import Nova3DError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(stage: Path, text: str) -> None:
    (stage / "sub").mkdir()
    (stage / "result.txt").write_text(text)
    (stage / "sub" / "deep.txt").write_text(text)


def test_staged_dir_replaces_on_success_and_keeps_on_any_failure(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, "test") as stage:
        _write(stage, "first")
    assert (out / "result.txt").read_text() == "first" and (out / MARKER).is_file()
    good = _files(out)
    for failure in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with staged_dir(out, "test") as stage:
                _write(stage, "half")
                raise failure
        assert _files(out) == good
        assert not out.with_name(out.name + PARTIAL_SUFFIX).exists()
    with staged_dir(out, "test") as stage:  # a rerun replaces the whole folder: no stale files stay
        (stage / "other.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "other.txt"]


def test_staged_dir_refuses_a_folder_nova3d_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(Nova3DError, match="nova3d did not write"):
        with staged_dir(mine, "test"):
            pytest.fail("must not start")
    assert (mine / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(Nova3DError, match="is a file"):
        with staged_dir(tmp_path / "file", "test"):
            pass
    with staged_dir(tmp_path / "empty", "test") as stage:  # missing or empty: fine
        (stage / "a").write_text("a")
    with pytest.raises(Nova3DError, match="--overwrite"):
        with staged_dir(tmp_path / "empty", "test", overwrite=False):
            pass


def test_a_kill_between_the_swaps_renames_is_recovered(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out, "test") as stage:
        _write(stage, "first")
    good = _files(out)
    out.rename(out.with_name(out.name + OLD_SUFFIX))  # killed after the first rename of the swap
    with pytest.raises(RuntimeError):
        with staged_dir(out, "test"):
            raise RuntimeError
    assert _files(out) == good


def test_staged_entries_replace_only_their_own_names(tmp_path):
    folder = tmp_path / "demo"
    (folder / "gt").mkdir(parents=True)
    (folder / "gt" / "kept.txt").write_text("render")
    (folder / "report.md").write_text("old")
    with staged_entries(folder, "demo") as stage:
        _write(stage, "new")
        (stage / "report.md").write_text("new")
    with pytest.raises(KeyboardInterrupt):
        with staged_entries(folder, "demo") as stage:
            (stage / "report.md").write_text("half")
            raise KeyboardInterrupt
    assert (folder / "report.md").read_text() == "new" and (folder / "gt" / "kept.txt").read_text() == "render"
    assert (folder / "sub" / "deep.txt").read_text() == "new"
    assert sorted(p.name for p in folder.iterdir()) == ["gt", "report.md", "result.txt", "sub"]


@dataclasses.dataclass
class _Result:
    out: Path
    runs: dict
    outside: Path


def test_moved_paths_reroots_only_paths_inside(tmp_path):
    stage, out = tmp_path / ".s.partial", tmp_path
    r = moved_paths(_Result(stage, {"a": [stage / "x" / "m.glb"]}, Path("/elsewhere/model")), stage, out)
    assert r.out == out and r.runs == {"a": [out / "x" / "m.glb"]} and r.outside == Path("/elsewhere/model")


def test_an_output_folder_that_cannot_be_written_is_found_first(tmp_path):
    """issue 25: a file, a path inside a file, or a place nothing can be created in fails at once."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")  # a data/ link whose cache was wiped
    check_writable(tmp_path / "new" / "deeper")  # missing folders are fine: they can be made
    assert not (tmp_path / "new").exists()  # and are not made by the check
    for bad, said in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", f"is inside {tmp_path / 'f'}"),
                      (Path("/proc/nova3d_out"), "cannot write"),
                      (tmp_path / "dangling" / "train", "links to .*missing, which does not exist")):
        with pytest.raises(Nova3DError, match=said):
            check_writable(bad)
        with pytest.raises(Nova3DError):
            check_replaceable(bad)
        with pytest.raises(Nova3DError):
            with staged_entries(bad):
                pass
    assert not list(tmp_path.glob(".nova3d-write-test-*"))  # the probe file is removed
