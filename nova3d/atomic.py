"""Writes that never leave a half-written result: write under a temporary name, then rename.

- `atomic_path`: one file.
- `staged_folder`: any folder (an exported pipeline, an object folder): built in FINAL.partial and
  swapped in whole on success, so a failed or killed run leaves the previous one exactly as it was.
- `staged_dir`: a result folder (fuse, eval, pose study, ...): `staged_folder` plus nova3d's marker,
  and the rule that a rerun replaces only a folder nova3d wrote.
- `staged_entries`: results that share a folder with other files (the demo, image-to-3d): built in
  a staging folder, whose entries replace the same-named ones of the folder on success.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from nova3d.errors import Nova3DError

PARTIAL_SUFFIX = ".partial"  # a folder being written
OLD_SUFFIX = ".old"  # the previous result during the swap (restored if a kill falls between the renames)
MARKER = ".nova3d-result"  # in every staged result folder: says nova3d wrote it, so a rerun may replace it


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, else remove it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _recover(final: Path) -> None:
    """A run killed between the two renames of a swap left FINAL.old and no FINAL: put it back."""
    old = final.with_name(final.name + OLD_SUFFIX)
    if old.is_dir() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(path: str | os.PathLike, option: str = "--out") -> None:
    """Raise Nova3DError unless a folder `path` exists or can be made, and files can be created
    in it (or, while it does not exist yet, beside it). Tries a real file: permission bits alone
    do not say it (root, read-only mounts). Every command calls it before its long work."""
    path = Path(path).expanduser()
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.is_symlink():  # mkdir through it fails later with a bare "File exists"
            raise Nova3DError(f"{option} {path}: {probe_dir} links to {os.readlink(probe_dir)}, which does not exist")
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        what = "is" if probe_dir == path else f"is inside {probe_dir}, which is"
        raise Nova3DError(f"{option} {path} {what} a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nova3d-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise Nova3DError(f"{option} {path}: cannot write in {probe_dir} ({err.strerror or err})") from err


def check_replaceable(final: str | os.PathLike, overwrite: bool = True) -> None:
    """Raise Nova3DError unless a staged result may later replace `final`: it is missing, an empty
    folder, or a result nova3d wrote (has MARKER) and `overwrite`, and its folder is writable.
    Call it before long work."""
    final = Path(final)
    check_writable(final)
    _recover(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise Nova3DError(f"{final}: is a file, not a folder")
    if not any(final.iterdir()):
        return
    if not (final / MARKER).is_file():
        raise Nova3DError(f"{final}: holds files nova3d did not write (no {MARKER}); "
                          "remove it or choose another output folder")
    if not overwrite:
        raise Nova3DError(f"{final} already exists; remove it, choose another output folder or pass --overwrite")


def mark_result(folder: Path, command: str) -> None:
    """Say that nova3d wrote `folder` (a rerun of a staged command may replace it)."""
    (folder / MARKER).write_text(json.dumps({"command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}))


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty FINAL.partial; on success it replaces `final` (if any) whole, on any error it
    is removed and `final` untouched. The caller decides first whether `final` may be replaced."""
    final = Path(final)
    _recover(final)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)  # left over from a killed run
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = final.with_name(final.name + OLD_SUFFIX)
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(partial, final)
    except BaseException:  # the new one cannot go in (or a signal came): the old one goes back
        _recover(final)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, command: str, overwrite: bool = True) -> Iterator[Path]:
    """`staged_folder` for a result folder: `final` is replaced only as check_replaceable allows,
    and `command` is recorded in the folder's MARKER."""
    check_replaceable(final, overwrite)
    with staged_folder(final) as partial:
        yield partial
        mark_result(partial, command)


@contextlib.contextmanager
def staged_entries(folder: str | os.PathLike, name: str = "staging") -> Iterator[Path]:
    """Yield an empty folder/.NAME.partial; on success each entry in it replaces the same-named
    entry of `folder` (other entries stay), on any error it is removed and `folder` untouched."""
    folder = Path(folder)
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{name}{PARTIAL_SUFFIX}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for entry in sorted(staging.iterdir()):
        target = folder / entry.name
        if target.exists() and (entry.is_dir() or target.is_dir()):  # os.replace cannot: swap as staged_dir does
            old = target.with_name(target.name + OLD_SUFFIX)
            _remove(old)
            os.replace(target, old)
            os.replace(entry, target)
            _remove(old)
        else:
            os.replace(entry, target)
    staging.rmdir()


def moved_paths(obj, src: Path, dst: Path):
    """`obj` with every Path under `src` re-rooted at `dst`: what a result built in a staging folder
    says once it is moved in (dataclasses, dicts, lists and tuples are walked; the rest is kept)."""
    if isinstance(obj, Path):
        return dst / obj.relative_to(src) if obj.is_relative_to(src) else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: moved_paths(getattr(obj, f.name), src, dst)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: moved_paths(v, src, dst) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved_paths(v, src, dst) for v in obj)
    return obj
