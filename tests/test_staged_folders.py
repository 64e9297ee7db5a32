"""Every folder a command writes goes through one swap (nova3d.atomic.staged_folder, issue 25
class 1): object folders (perturb, generate) and pipelines (export) as well as result folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers_objects import make_object_folder
from nova3d.atomic import OLD_SUFFIX, PARTIAL_SUFFIX, staged_folder
from nova3d.data.object_folder import write_object_sample
from nova3d.data.shards import read_object_folder


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_staged_folder_swaps_in_whole_and_keeps_the_old_on_failure(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as stage:
        (stage / "a.txt").write_text("first")
    for failure in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with staged_folder(out) as stage:
                (stage / "a.txt").write_text("half")
                raise failure
        assert _files(out) == {"a.txt": b"first"}
    with staged_folder(out) as stage:  # the new folder replaces the old whole: nothing stale stays
        (stage / "b.txt").write_text("second")
    assert _files(out) == {"b.txt": b"second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "out").rename(tmp_path / f"out{OLD_SUFFIX}")  # killed between the two renames of a swap
    with pytest.raises(RuntimeError):
        with staged_folder(out):
            raise RuntimeError
    assert _files(out) == {"b.txt": b"second"}  # the old one was put back first


def test_an_object_folder_overwrite_that_fails_keeps_the_old_folder(tmp_path):
    sample = read_object_folder(make_object_folder(tmp_path / "src", "obj", views=4, res=16))
    dst = tmp_path / "dst" / "obj"
    write_object_sample(sample, dst)
    good = _files(dst)

    def fail(partial: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_object_sample(sample, dst, overwrite=True, extra=fail)
    assert _files(dst) == good
    assert sorted(p.name for p in dst.parent.iterdir()) == ["obj"]
    assert not list(tmp_path.rglob(f"*{PARTIAL_SUFFIX}"))


def test_a_swap_that_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with staged_folder(out) as stage:
        (stage / "a.txt").write_text("first")
    real_replace = os.replace

    def full_disk(src, dst):
        if str(src).endswith(PARTIAL_SUFFIX):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        with staged_folder(out) as stage:
            (stage / "a.txt").write_text("second")
    assert _files(out) == {"a.txt": b"first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
