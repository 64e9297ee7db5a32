"""Nothing lost, nothing silent: interrupted writes, reruns, flipped bytes, all-rejected packs."""
import json
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

import data_prep.write_shards as ws
from data_prep.write_shards import write_shards
from nova3d.config import DataConfig
from nova3d.data import schema
from nova3d.data.datamodule import MultiViewDataModule, _nothing_read_message
from nova3d.data.inspect import inspect_shards, main as inspect_main
from nova3d.data.manifest import IncompleteShardsError, Manifest, resolve_shards
from nova3d.data.sample_error import SampleError
from nova3d.data.shards import ShardReadError, decode_sample, encode_sample, iter_tar_samples, read_object_folder
from nova3d.errors import Nova3DError
from tests.helpers_objects import make_object_folder, rewrite_tar

VIEWS, RES = 4, 16


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    for i in range(5):
        make_object_folder(root, f"obj{i}", views=VIEWS, res=RES, seed=i, noise=0.02, with_depth=(i == 0))
    return root


def _interrupted(renders: Path, out: Path, monkeypatch, after: int = 3) -> None:
    """write_shards killed while packing object `after` + 1 (max_count=2: one shard done, one open)."""
    real, calls = ws.encode_sample, []

    def failing(sample, enc):
        calls.append(sample.object_id)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(sample, enc)

    monkeypatch.setattr(ws, "encode_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(renders, out, max_count=2, progress=False)
    monkeypatch.setattr(ws, "encode_sample", real)


def _dm(spec, **kw) -> MultiViewDataModule:
    cfg = dict(train_shards=str(spec), resolution=RES, num_views=2, batch_size=1, num_workers=0,
               samples_per_epoch=2, shuffle_buffer=1)
    return MultiViewDataModule(DataConfig(**{**cfg, **kw}))


# --- 1. an interrupted write_shards does not look complete --------------------------------------

def test_folder_of_shards_without_manifest_is_refused(renders, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _interrupted(renders, out, monkeypatch)
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]  # 2 of 5 objects, no manifest
    with pytest.raises(Nova3DError, match=r"out: incomplete shard set \(shards but no manifest.json: "
                                          r"write_shards was interrupted\?\); rerun write_shards"):
        _dm(out).setup("fit")
    report = inspect_shards(out)
    assert not report.ok and report.num_samples == 2  # flagged, and what is there is still inspected
    assert len(report.problems) == 1 and "incomplete shard set" in report.problems[0]
    assert inspect_main([str(out)]) == 1
    assert "PROBLEM " + str(out) + ": incomplete shard set" in capsys.readouterr().out
    # Naming the tar files themselves stays manifest-free.
    single = str(out / "train-000000.tar")
    assert resolve_shards(single) == [single] == resolve_shards(str(out / "train-{000000..000000}.tar"))
    assert inspect_shards(single).ok


def test_a_sub_folder_does_not_borrow_its_parents_manifest(renders, tmp_path):
    write_shards(renders, tmp_path, max_count=2, progress=False)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train-000000.tar").write_bytes((tmp_path / "train-000000.tar").read_bytes())
    with pytest.raises(IncompleteShardsError):
        resolve_shards(tmp_path / "sub", split="train")  # not the parent's three shards


# --- 2. a rerun resumes or redoes ----------------------------------------------------------------

def test_rerun_after_an_interrupted_write_completes_it(renders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(renders, out, monkeypatch)
    (out / "train-000007.tar.partial").write_bytes(b"half a shard")  # what a SIGKILL of a bigger run left
    summary = write_shards(renders, out, max_count=2, progress=False)
    assert not summary.up_to_date and summary.num_samples == 5
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar"]
    assert inspect_shards(out).ok


def test_rerun_keeps_current_shards_and_redoes_stale_ones(renders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = write_shards(renders, out, max_count=2, progress=False)
    sha = [s.sha256 for s in first.shards]

    def rerun(**kw):
        return write_shards(renders, out, max_count=2, progress=False, **kw)

    assert rerun().up_to_date
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])  # truncated: same name, other size
    assert not rerun().up_to_date and [s.sha256 for s in Manifest.load(out).shards] == sha
    (out / "train-000009.tar").write_bytes(b"")  # a shard the manifest does not list
    assert not rerun().up_to_date and not (out / "train-000009.tar").exists()
    assert not rerun(encoding=schema.ShardEncoding(level=1)).up_to_date  # other encoding
    assert not rerun(val_fraction=0.4).up_to_date and Manifest.load(out).splits["val"]["num_samples"] == 2
    assert rerun(val_fraction=0.4).up_to_date
    # A rewrite that dies leaves no manifest (deleted first): the folder is visibly incomplete.
    _interrupted(renders, out, monkeypatch, after=0)
    assert not (out / "manifest.json").exists() and not list(out.iterdir())
    assert ws.main([str(renders), "--out", str(out), "--update", "--no-progress"]) == 0  # --update: accepted
    assert ws.main([str(renders), "--out", str(out), "--no-progress"]) == 0 and rerun(val_fraction=0).up_to_date


# --- 3. flipped bytes inside a sample are caught on the read path -------------------------------

def _flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def _spread(data: bytes) -> tuple[int, ...]:
    return 0, len(data) // 3, len(data) // 2, 2 * len(data) // 3, len(data) - 1


def test_a_flipped_byte_in_any_member_is_a_skipped_sample(renders):
    raw = encode_sample(read_object_folder(renders / "obj0"))  # has depth: every member kind
    members = {*schema.SHARD_REQUIRED_KEYS, schema.KEY_DEPTH}
    assert set(raw) - {"__key__"} == {*members, schema.KEY_CRC}
    assert json.loads(raw[schema.KEY_CRC]) == {k: zlib.crc32(raw[k]) for k in members}  # arrays and JSON alike
    for key in schema.ARRAY_KEYS:  # one mechanism: no zstd frame checksums, only crc32.json
        params = zstandard.get_frame_parameters(raw[key])
        assert not params.has_checksum and params.content_size > 0
    for key, data in raw.items():
        if key == "__key__":
            continue
        for at in _spread(data):
            with pytest.raises(SampleError) as err:
                decode_sample({**raw, key: _flipped(data, at)})
            assert err.value.reason == "undecodable", (key, at, err.value)
            if key != schema.KEY_CRC:  # caught by its crc32 before decoding, whatever the bytes would decode to
                assert f": {key}: crc32 mismatch (corrupt shard member)" in str(err.value), (key, at)
    without_depth = {k: v for k, v in raw.items() if k != schema.KEY_DEPTH}  # a listed member lost
    with pytest.raises(SampleError, match="crc32.json lists depth.npy.zst, which the sample lacks"):
        decode_sample(without_depth)


def test_shards_without_crc_member_still_decode(renders):
    """Shards written before checksums: no crc32.json member (and zstd frames without a checksum)."""
    obj = read_object_folder(renders / "obj0")
    raw = encode_sample(obj, schema.ShardEncoding(checksums=False))
    assert schema.KEY_CRC not in raw and not zstandard.get_frame_parameters(raw[schema.KEY_RGB]).has_checksum
    back = decode_sample(raw)
    for name in ("rgba", "normal", "mask", "depth"):
        np.testing.assert_array_equal(getattr(back, name), getattr(obj, name))


def test_shards_with_zstd_frame_checksums_still_decode(renders):
    """Shards written with zstd content checksums and crc32.json covering only the JSON members."""
    obj = read_object_folder(renders / "obj0")
    raw = encode_sample(obj, schema.ShardEncoding(checksums=False))
    recompress = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    for key in schema.ARRAY_KEYS:
        raw[key] = recompress.compress(zstandard.ZstdDecompressor().decompress(raw[key]))
        assert zstandard.get_frame_parameters(raw[key]).has_checksum
    raw[schema.KEY_CRC] = json.dumps({k: zlib.crc32(raw[k]) for k in (schema.KEY_META, schema.KEY_CAMERAS)}).encode()
    back = decode_sample(raw)
    for name in ("rgba", "normal", "mask", "depth"):
        np.testing.assert_array_equal(getattr(back, name), getattr(obj, name))
    with pytest.raises(SampleError) as err:  # zstd verifies those frames itself
        decode_sample({**raw, schema.KEY_RGB: _flipped(raw[schema.KEY_RGB], len(raw[schema.KEY_RGB]) // 2)})
    assert err.value.reason == "undecodable" and "rgb.npy.zst: ZstdError" in str(err.value)


def test_flipped_member_is_skipped_by_the_datamodule(renders, tmp_path):
    write_shards(renders, tmp_path / "s", progress=False)
    bad = tmp_path / "bad.tar"
    rewrite_tar(tmp_path / "s" / "train-000000.tar", bad,
                lambda name, d: _flipped(d, len(d) // 2) if name in ("obj1.rgb.npy.zst", "obj3.cameras.json") else d)
    dm = _dm(bad)
    dm.setup("validate")
    with pytest.warns(RuntimeWarning, match="crc32 mismatch") as caught:
        ids = [oid for b in dm.val_dataloader() for oid in b.object_ids]
    assert ids == ["obj0", "obj2", "obj4"] and dm.skipped.counts["undecodable"] == 2
    crc_warnings = [str(w.message) for w in caught if "crc32 mismatch" in str(w.message)]
    assert len(crc_warnings) == 2
    assert "obj1: rgb.npy.zst:" in crc_warnings[0] and "obj3: cameras.json:" in crc_warnings[1]


def test_a_flipped_tar_header_does_not_silently_end_the_shard(renders, tmp_path):
    """tarfile stops at a header whose checksum fails as if the archive ended: samples after it
    would be lost without a word."""
    write_shards(renders, tmp_path / "s", progress=False)
    src = tmp_path / "s" / "train-000000.tar"
    with tarfile.open(src) as tar:
        header = next(m.offset for m in tar.getmembers() if m.name.startswith("obj2."))
    (tmp_path / "bad.tar").write_bytes(_flipped(src.read_bytes(), header + 20))
    keys = []
    with pytest.raises(ShardReadError, match="after 1 samples.*corrupted member header"):
        for sample in iter_tar_samples(str(tmp_path / "bad.tar")):
            keys.append(sample["__key__"])
    assert keys == ["obj0"]  # obj1, being read when the tar broke, is dropped: it cannot be known whole


def test_a_flipped_byte_in_an_object_folder_png_is_rejected(tmp_path):
    """Object folder PNGs (the writer's input) are checked by libpng: chunk CRCs and zlib's adler32."""
    folder = make_object_folder(tmp_path / "r", "obj", views=2, res=RES, noise=0.02)
    for sub in (schema.RGB_DIR, schema.NORMAL_DIR, schema.MASK_DIR):
        png = folder / sub / "001.png"
        good = png.read_bytes()
        png.write_bytes(_flipped(good, good.index(b"IDAT") + 20))
        with pytest.raises(SampleError, match="not a readable PNG"):
            read_object_folder(folder)
        png.write_bytes(good)


# --- 4. nothing packed is a failure -------------------------------------------------------------

def test_write_shards_exits_2_when_every_object_is_rejected(tmp_path, capsys):
    renders = tmp_path / "r"
    (make_object_folder(renders, "a", views=2, res=RES) / "rgb" / "001.png").unlink()
    (make_object_folder(renders, "b", views=2, res=RES) / "mask" / "000.png").write_bytes(b"not a png")
    for _ in range(2):  # the rerun finds the same (empty) result up to date, and fails the same way
        assert ws.main([str(renders), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("rejected a [missing_file]") and err[1].startswith("rejected b [undecodable]")
        assert err[2].startswith(f"write_shards: error: {renders}: all 2 objects rejected, none packed "
                                 "(first: a [missing_file]: ") and len(err) == 3


# --- 5. the DataModule says why nothing could be read --------------------------------------------

def test_all_shards_unreadable_says_so(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"\0" * 100)
    dm = _dm(tmp_path / "train-000000.tar")
    dm.setup("fit")
    with warnings.catch_warnings(), pytest.raises(Nova3DError) as err:
        warnings.simplefilter("ignore")
        next(iter(dm.train_dataloader()))
    message = str(err.value)
    assert "1 of 1 shards unreadable (first: " + str(tmp_path / "train-000000.tar") + ": truncated" in message
    assert "ranks" not in message


def test_no_sample_message_names_the_real_cause():
    assert _nothing_read_message((1, 2), 9, {"a.tar": None}).endswith(": fewer training samples than ranks?")
    mixed = _nothing_read_message((1, 2), 9, {"a.tar": "a.tar: truncated", "b.tar": None})
    assert "1 of 2 shards unreadable (first: a.tar: truncated); fewer training samples than ranks?" in mixed
    assert _nothing_read_message((0, 1), 9, {"a.tar": None}).endswith("the readable shards hold no samples")
