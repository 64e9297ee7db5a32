"""Shard writer, sample codec, manifest and inspect-shards (tiny objects: 8 views at 32²)."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import data_prep.write_shards as ws
from data_prep.write_shards import write_shards
from nova3d.cameras import decode_normals
from nova3d.data import schema
from nova3d.data.inspect import inspect_shards, main as inspect_main
from nova3d.data.manifest import Manifest, resolve_shards
from nova3d.data.png import encode_png16, read_png
from nova3d.data.shards import (ShardReadError, decode_sample, encode_sample, evenly_spaced_views, iter_tar_samples,
                                read_object_folder)
from nova3d.errors import Nova3DError
from tests.helpers_objects import make_object_folder, rewrite_tar, synthetic_views

VIEWS, RES = 8, 32


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    for i in range(5):
        make_object_folder(root, f"obj{i}", views=VIEWS, res=RES, seed=i, noise=0.02, with_depth=(i == 0))
    return root


@pytest.fixture(scope="module")
def shards(renders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(renders, out, max_count=2, progress=False)
    return out


def test_png16_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for channels in (1, 3, 4):
        image = rng.integers(0, 65536, (7, 5, channels), dtype=np.uint16)
        (tmp_path / "a.png").write_bytes(encode_png16(image))
        np.testing.assert_array_equal(read_png(tmp_path / "a.png", channels, np.uint16), image.transpose(2, 0, 1))


def test_normal_precision_16_bit():
    """Stored normals lose < 0.002 deg to 16-bit quantisation (bound: ~sqrt(3)/65535 rad = 0.0015 deg)."""
    gt = synthetic_views(4, 64)
    n = torch.nn.functional.normalize(torch.from_numpy(gt.normals_stored[gt.mask]).double(), dim=-1)
    stored = torch.round((n + 1) / 2 * 65535) / 65535  # what a 16-bit PNG holds
    back = decode_normals(stored)
    angle = torch.atan2(torch.linalg.cross(back, n).norm(dim=-1), (back * n).sum(-1))  # stable near 0
    assert math.degrees(angle.max()) < 0.002


def test_sample_codec_is_lossless(renders):
    obj = read_object_folder(renders / "obj0")
    assert obj.rgba.shape == (VIEWS, 4, RES, RES) and obj.normal.dtype == np.uint16 and obj.depth is not None
    raw = {k: v for k, v in encode_sample(obj).items()}
    back = decode_sample(raw)
    for name in ("rgba", "normal", "mask", "depth"):
        np.testing.assert_array_equal(getattr(back, name), getattr(obj, name))
    torch.testing.assert_close(back.cameras.c2w, obj.cameras.c2w)
    views = [5, 7, 1]
    part = decode_sample(raw, views)
    assert part.views == views and len(part.cameras) == VIEWS
    np.testing.assert_array_equal(part.normal, obj.normal[views])
    np.testing.assert_array_equal(part.rgba, obj.rgba[views])


def test_evenly_spaced_views():
    assert evenly_spaced_views(16, 4) == [0, 4, 8, 12]
    assert evenly_spaced_views(16, 4, start=14) == [14, 2, 6, 10]
    assert evenly_spaced_views(16, 6) == [0, 2, 5, 8, 10, 13]
    with pytest.raises(Nova3DError):
        evenly_spaced_views(4, 6)


def test_shards_names_manifest_and_checksums(shards):
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(shards.glob("*" + schema.TMP_SUFFIX))
    manifest = Manifest.load(shards)
    assert manifest.splits["train"] == {"pattern": "train-{000000..000002}.tar", "num_shards": 3, "num_samples": 5}
    assert [s.objects for s in manifest.shards] == [["obj0", "obj1"], ["obj2", "obj3"], ["obj4"]]
    assert manifest.encoding == {"codec": "zstd", "level": 3, "filter": "row_delta", "checksums": True,
                                 "format_version": 1}
    for info in manifest.shards:
        data = (shards / info.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.num_bytes
    files = [str(shards / n) for n in names]
    assert resolve_shards(str(shards / manifest.splits["train"]["pattern"])) == files
    assert resolve_shards(shards) == files == resolve_shards(shards / "manifest.json")
    assert [s["__key__"] for f in files for s in iter_tar_samples(f)] == [f"obj{i}" for i in range(5)]


def test_shards_are_reproducible_and_split_by_size_and_val(renders, tmp_path):
    a = write_shards(renders, tmp_path / "a", max_size=1, val_fraction=0.4, progress=False)
    b = write_shards(renders, tmp_path / "b", max_size=1, val_fraction=0.4, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # byte-identical
    assert all(s.num_samples == 1 for s in a.shards)  # max_size 1 byte: one object per shard
    manifest = Manifest.load(tmp_path / "a")
    assert manifest.splits["train"]["num_samples"] == 3 and manifest.splits["val"]["num_samples"] == 2
    val = {o for s in manifest.shards if s.split == "val" for o in s.objects}
    train = {o for s in manifest.shards if s.split == "train" for o in s.objects}
    assert not val & train and len(val | train) == 5
    assert len(resolve_shards(tmp_path / "a", split="val")) == 2
    assert (tmp_path / "a" / "val-000001.tar").is_file()
    with pytest.raises(Nova3DError, match="already holds shards"):
        write_shards(renders, tmp_path / "a", update=False, progress=False)


def test_broken_object_folders_are_rejected_with_reasons(tmp_path):
    root = tmp_path / "renders"
    make_object_folder(root, "good", views=4, res=16)
    (make_object_folder(root, "missing", views=4, res=16) / "normal" / "002.png").unlink()
    (make_object_folder(root, "garbage", views=4, res=16) / "rgb" / "001.png").write_bytes(b"not a png")
    wrong = make_object_folder(root, "wrongsize", views=4, res=16)
    (wrong / "mask" / "003.png").write_bytes((make_object_folder(tmp_path, "big", views=4, res=24)
                                              / "mask" / "003.png").read_bytes())
    cams = json.loads((make_object_folder(root, "nancam", views=4, res=16) / "cameras.json").read_text())
    cams["frames"][1]["c2w"][0][3] = float("nan")
    (root / "nancam" / "cameras.json").write_text(json.dumps(cams))
    (root / "notes").mkdir()  # not an object folder: ignored
    summary = ws.write_shards(root, tmp_path / "out", progress=False)
    reasons = {r.object_id: r.reason for r in summary.rejected}
    assert reasons == {"missing": "missing_file", "garbage": "undecodable", "wrongsize": "invalid",
                       "nancam": "invalid"}
    details = {r.object_id: r.detail for r in summary.rejected}
    assert "normal/002.png is missing" in details["missing"] and "NaN" in details["nancam"]
    assert summary.num_samples == 1
    assert [r["object_id"] for r in Manifest.load(tmp_path / "out").rejected] == sorted(reasons)


def test_shard_write_is_atomic(renders, tmp_path, monkeypatch):
    real, calls = ws.encode_sample, []

    def failing(sample, enc):
        calls.append(sample.object_id)
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return real(sample, enc)

    monkeypatch.setattr(ws, "encode_sample", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(renders, tmp_path, max_count=2, progress=False)
    # The first shard was complete; the second was being written: it must not exist, even half.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    assert len(list(iter_tar_samples(str(tmp_path / "train-000000.tar")))) == 2


def _corrupt_copies(shards: Path, dst: Path) -> str:
    """dst/: one good shard, one truncated, one without a key, one with garbage image bytes (their pattern:
    the folder has no manifest)."""
    dst.mkdir()
    data = (shards / "train-000000.tar").read_bytes()
    (dst / "train-000000.tar").write_bytes(data)
    (dst / "train-000001.tar").write_bytes(data[: len(data) // 2])
    rewrite_tar(shards / "train-000001.tar", dst / "train-000002.tar",
                lambda name, d: None if name == "obj2.normal.npy.zst" else d)
    rewrite_tar(shards / "train-000002.tar", dst / "train-000003.tar",
                lambda name, d: b"garbage" if name.endswith("rgb.npy.zst") else d)
    return str(dst / "train-{000000..000003}.tar")


def test_inspect_shards_good(shards, capsys):
    report = inspect_shards(shards)
    assert report.ok and report.num_samples == 5 and all(s.checksum == "ok" for s in report.shards)
    assert dict(report.shards[0].shapes[schema.KEY_NORMAL]) == {f"[{VIEWS},3,{RES},{RES}] uint16": 2}
    assert inspect_main([str(shards)]) == 0
    assert "total: 3 shards, 5 samples, 0 problems" in capsys.readouterr().out


def test_inspect_shards_reports_each_problem(shards, tmp_path, capsys):
    bad = _corrupt_copies(shards, tmp_path / "bad")
    assert inspect_main([bad]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PROBLEM")]
    assert len(lines) == 3, lines
    assert "train-000001.tar: truncated or unreadable tar after 1 samples (ReadError" in lines[0]
    assert "train-000002.tar: sample obj2: missing normal.npy.zst [missing_key]" in lines[1]
    assert "train-000003.tar: sample obj4: rgb.npy.zst" in lines[2] and "[undecodable]" in lines[2]


def test_inspect_shards_checks_the_manifest(shards, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shards.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    rewrite_tar(shards / "train-000001.tar", copy / "train-000001.tar",
                lambda name, d: None if name.startswith("obj3.") else d)  # a whole sample gone
    (copy / "train-000002.tar").unlink()
    report = inspect_shards(copy)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "train-000001.tar: sha256 differs" in text and "1 good samples, manifest lists 2" in text
    assert "train-000002.tar: listed in" in text and "missing" in text


def test_tar_cut_between_samples_is_detected(shards, tmp_path):
    """tarfile takes a tar cut at a header boundary for a whole one; the end-marker check does not."""
    import tarfile

    src = shards / "train-000000.tar"
    with tarfile.open(src) as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith("obj1."))
    (tmp_path / "cut.tar").write_bytes(src.read_bytes()[:cut])
    samples = []
    with pytest.raises(ShardReadError, match="after 0 samples.*no end-of-archive marker"):
        for sample in iter_tar_samples(str(tmp_path / "cut.tar")):
            samples.append(sample["__key__"])
    assert samples == []  # obj0 may have lost members at the cut: dropped, not trusted


def test_write_shards_update_keeps_current_shards_and_rewrites_stale_ones(tmp_path):
    """`make demo` twice: a rerun (the default; update=False refuses) keeps shards that hold exactly
    the render folder's objects and rewrites them when the objects changed."""
    renders, out = tmp_path / "renders", tmp_path / "shards"
    for i in range(3):
        make_object_folder(renders, f"obj{i}", views=2, res=16, seed=i)
    first = write_shards(renders, out, progress=False)
    assert not first.up_to_date and first.num_samples == 3
    with pytest.raises(Nova3DError, match="already holds shards"):
        write_shards(renders, out, update=False, progress=False)
    before = (out / "train-000000.tar").stat().st_mtime_ns
    again = write_shards(renders, out, progress=False)
    assert again.up_to_date and again.num_samples == 3
    assert (out / "train-000000.tar").stat().st_mtime_ns == before  # nothing rewritten
    make_object_folder(renders, "obj3", views=2, res=16, seed=3)
    grown = write_shards(renders, out, progress=False)
    assert not grown.up_to_date and grown.num_samples == 4
    assert Manifest.load(out).splits["train"]["num_samples"] == 4
    # a held-out split's folder records its own split name (what DataModules look up)
    test = write_shards(renders, tmp_path / "test", prefix="test", split="test", progress=False)
    assert [s.split for s in test.shards] == ["test"] and (tmp_path / "test" / "test-000000.tar").is_file()
