"""The shard sample codec (shared by data_prep/write_shards.py and the DataModule), reading
object folders, and reading shards back as samples.

Keys and encodings are defined in `nova3d.data.schema` ("Shard samples"); manifests and shard
lists are in `nova3d.data.manifest`, PNG reading and writing in `nova3d.data.png`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import zstandard
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.data.png import read_png
from nova3d.data.sample_error import INVALID, MISSING_FILE, MISSING_KEY, UNDECODABLE, SampleError
from nova3d.errors import Nova3DError


@dataclass
class ObjectSample:
    """One object's views as stored (planar integer arrays, exactly the object folder's values)."""

    object_id: str
    rgba: np.ndarray  # [V, 4, H, W] uint8, straight colour + coverage alpha
    normal: np.ndarray  # [V, 3, H, W] uint16, (n + 1) / 2 * 65535 in cameras.normal_frame
    mask: np.ndarray  # [V, H, W] uint8, 255 = object
    cameras: Cameras  # the whole stored orbit, even when the arrays hold only some `views`
    meta: dict  # ObjectMeta fields (+ "shard_encoding" once read back from a shard)
    depth: np.ndarray | None = None  # [V, H, W] uint16, depth * DEPTH_SCALE
    views: list[int] | None = None  # stored view index of each array entry; None: all, in order

    def validate(self) -> "ObjectSample":
        """Raise SampleError(INVALID) unless shapes, dtypes and cameras agree."""
        V, H, W = self.mask.shape if self.mask.ndim == 3 else (None, None, None)
        expected = {"rgb": (self.rgba, (V, 4, H, W), np.uint8), "normal": (self.normal, (V, 3, H, W), np.uint16),
                    "mask": (self.mask, (V, H, W), np.uint8)}
        if self.depth is not None:
            expected["depth"] = (self.depth, (V, H, W), np.uint16)
        for name, (array, shape, dtype) in expected.items():
            if array.shape != shape or array.dtype != dtype:
                raise SampleError(INVALID, f"{name}: {array.shape} {array.dtype}, expected {shape} {np.dtype(dtype)}")
        cams = self.cameras
        held = len(self.views) if self.views is not None else len(cams)
        if held != V or (cams.width, cams.height) != (W, H):
            raise SampleError(INVALID, f"cameras: {len(cams)} views of {cams.width}x{cams.height}, "
                                       f"images: {V} views of {W}x{H}")
        if H != W:
            raise SampleError(INVALID, f"images are {W}x{H}; only square views are supported")
        if not (torch.isfinite(cams.c2w).all() and torch.isfinite(cams.K).all()):
            raise SampleError(INVALID, "cameras: c2w or K has NaN/inf entries")
        return self


def read_object_folder(folder: str | os.PathLike) -> ObjectSample:
    """Load and check a complete object folder (schema.py); SampleError says what is wrong."""
    folder = Path(folder)
    missing = schema.missing_files(folder)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        reason = MISSING_FILE if missing[0].endswith(" is missing") else INVALID  # else: a broken meta.json
        raise SampleError(reason, "; ".join(missing[:3]) + more)
    meta = schema.ObjectMeta.load(folder / schema.META_FILE)
    try:
        cameras = Cameras.load(folder / schema.CAMERAS_FILE)
    except ValueError as err:
        raise SampleError(INVALID, str(err)) from err

    def stack(sub: str, channels: int, dtype: type) -> np.ndarray:
        images = [read_png(folder / sub / schema.view_name(i), channels, dtype) for i in range(meta.num_views)]
        sizes = {im.shape[1:] for im in images}
        if sizes != {(meta.resolution, meta.resolution)}:
            raise SampleError(INVALID, f"{folder / sub}: image sizes {sorted(sizes)}, meta.json says "
                                       f"{meta.resolution}x{meta.resolution}")
        return np.stack(images)

    sample = ObjectSample(
        object_id=meta.object_id, rgba=stack(schema.RGB_DIR, 4, np.uint8),
        normal=stack(schema.NORMAL_DIR, 3, np.uint16), mask=stack(schema.MASK_DIR, 1, np.uint8)[:, 0],
        cameras=cameras, meta=dataclasses.asdict(meta),
        depth=stack(schema.DEPTH_DIR, 1, np.uint16)[:, 0] if meta.has_depth else None)
    try:
        return sample.validate()
    except SampleError as err:
        raise SampleError(err.reason, f"{folder}: {err}") from err


# --- shard sample codec -------------------------------------------------------------------
def _encode_array(array: np.ndarray, enc: schema.ShardEncoding) -> bytes:
    """[V, ..., H, W] unsigned ints -> zstd-compressed .npy of the (row-delta filtered) array.

    No zstd frame checksum: KEY_CRC covers the compressed bytes (a third of the cost)."""
    filtered = array.copy()
    if enc.filter == schema.ROW_DELTA:
        filtered[..., 1:, :] = np.diff(array, axis=-2)  # unsigned: wraps, undone exactly by a running sum
    buf = io.BytesIO()
    np.save(buf, filtered, allow_pickle=False)
    compressor = zstandard.ZstdCompressor(level=enc.level, write_checksum=False, write_content_size=True)
    return compressor.compress(buf.getvalue())


def _decode_array(data: bytes, filter_name: str, views: list[int] | None) -> np.ndarray:
    """Inverse of _encode_array, undoing the filter only for `views` (all when None).

    Frames that carry a content checksum (shards written with one) are verified by zstd."""
    array = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)
    if views is not None:
        array = array[views]  # fancy indexing copies, so the array is writable
    if filter_name == schema.ROW_DELTA:
        # A loop over rows, vectorised over views/channels/columns: ~10x faster than np.cumsum.
        for r in range(1, array.shape[-2]):
            np.add(array[..., r, :], array[..., r - 1, :], out=array[..., r, :])
    elif filter_name != schema.NO_FILTER:
        raise SampleError(UNDECODABLE, f"unknown array filter {filter_name!r}")
    return array


def encode_sample(sample: ObjectSample, enc: schema.ShardEncoding = schema.ShardEncoding()) -> dict:
    """ObjectSample -> {"__key__": id, schema key: bytes} for a tar writer."""
    meta = dict(sample.meta, shard_encoding=dataclasses.asdict(enc))
    out = {"__key__": schema.safe_object_id(sample.object_id),
           schema.KEY_RGB: _encode_array(sample.rgba, enc), schema.KEY_NORMAL: _encode_array(sample.normal, enc),
           schema.KEY_MASK: _encode_array(sample.mask, enc),
           schema.KEY_CAMERAS: json.dumps(sample.cameras.to_json()).encode(),
           schema.KEY_META: json.dumps(meta).encode()}
    if sample.depth is not None:
        out[schema.KEY_DEPTH] = _encode_array(sample.depth, enc)
    return with_member_crcs(out) if enc.checksums else out


# --- member checksums (KEY_CRC) ------------------------------------------------------------
def with_member_crcs(sample: dict, recorded: dict[str, int] | None = None) -> dict:
    """`sample` plus KEY_CRC: the crc32 of every other member's bytes (`recorded` ones kept as given)."""
    crcs = {k: zlib.crc32(v) for k, v in sample.items() if not k.startswith("__") and k != schema.KEY_CRC}
    crcs.update(recorded or {})
    return {**sample, schema.KEY_CRC: json.dumps(crcs, sort_keys=True).encode()}


def recorded_crcs(raw: dict, name: str) -> dict[str, int]:
    """{member: crc32} from a sample's KEY_CRC; {} for shards written without one (read unchecked).

    SampleError(UNDECODABLE) when KEY_CRC is unreadable or lists a member the sample lacks."""
    if schema.KEY_CRC not in raw:
        return {}
    try:
        crcs = {str(k): int(v) for k, v in json.loads(raw[schema.KEY_CRC]).items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise SampleError(UNDECODABLE, f"{name}: {schema.KEY_CRC}: {type(err).__name__}: {err}") from err
    lost = sorted(k for k in crcs if k not in raw)
    if lost:
        raise SampleError(UNDECODABLE, f"{name}: {schema.KEY_CRC} lists {', '.join(lost)}, which the sample lacks")
    return crcs


def verified_member(raw: dict, key: str, crcs: dict[str, int], name: str) -> bytes:
    """raw[key], after checking it against its crc32 in `crcs` (unlisted members: unchecked)."""
    data = raw[key]
    if key in crcs and zlib.crc32(data) != crcs[key]:
        raise SampleError(UNDECODABLE, f"{name}: {key}: crc32 mismatch (corrupt shard member)")
    return data


def stored_num_views(raw: dict) -> int:
    """How many views a shard sample stores (from its meta.json), without decoding images."""
    try:
        return int(json.loads(raw[schema.KEY_META])["num_views"])
    except KeyError as err:
        raise SampleError(MISSING_KEY, f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}: "
                                       f"missing {err}") from err
    except (ValueError, TypeError) as err:
        raise SampleError(UNDECODABLE, f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}: "
                                       f"{schema.KEY_META}: {err}") from err


def decode_sample(raw: dict, views: list[int] | None = None) -> ObjectSample:
    """WebDataset sample {key: bytes} -> ObjectSample (only `views`, in that order, when given).

    Each member is checked against its crc32 in KEY_CRC before it is decoded. Raises
    SampleError(MISSING_KEY / UNDECODABLE / INVALID) naming the sample and the key.
    """
    name = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    missing = [k for k in schema.SHARD_REQUIRED_KEYS if k not in raw]
    if missing:
        raise SampleError(MISSING_KEY, f"{name}: missing {', '.join(missing)}")
    crcs = recorded_crcs(raw, name)
    key = schema.KEY_META
    try:
        meta = json.loads(verified_member(raw, key, crcs, name))
        filter_name = meta["shard_encoding"]["filter"]
        key = schema.KEY_CAMERAS
        cameras = Cameras.from_json(json.loads(verified_member(raw, key, crcs, name)))
        if views is not None:
            views = [int(v) for v in views]
            if max(views, default=0) >= len(cameras) or min(views, default=0) < 0:
                raise SampleError(INVALID, f"{name}: views {views} out of range for {len(cameras)} views")
        arrays = {}
        for key in schema.ARRAY_KEYS:
            if key in raw:
                arrays[key] = _decode_array(verified_member(raw, key, crcs, name), filter_name, views)
    except SampleError:
        raise
    except Exception as err:  # zstd, npy, JSON and key errors all mean "cannot decode this entry"
        raise SampleError(UNDECODABLE, f"{name}: {key}: {type(err).__name__}: {err}") from err
    sample = ObjectSample(meta.get("object_id", raw["__key__"]), arrays[schema.KEY_RGB], arrays[schema.KEY_NORMAL],
                          arrays[schema.KEY_MASK], cameras, meta, arrays.get(schema.KEY_DEPTH), views)
    try:
        return sample.validate()
    except SampleError as err:
        raise SampleError(err.reason, f"{name}: {err}") from err


# --- reading shards ------------------------------------------------------------------------
class ShardReadError(Nova3DError):
    """A shard that cannot be read to its end (missing, truncated, not a tar)."""

    def __init__(self, url: str, samples_read: int, cause: BaseException):
        super().__init__(f"{url}: truncated or unreadable tar after {samples_read} samples "
                         f"({type(cause).__name__}: {cause})")
        self.url, self.samples_read = url, samples_read


class _EndTracker:
    """Read-only stream wrapper counting the bytes read and where the last non-zero one ends."""

    def __init__(self, stream):
        self.stream, self.size, self.data_end = stream, 0, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        kept = len(data.rstrip(b"\0"))  # no copy when data does not end in zeros
        if kept:
            self.data_end = self.size + kept
        self.size += len(data)
        return data


_TAR_END_MARKER = 1024  # a tar ends with two zero blocks


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Samples {"__key__", "__url__", suffix: bytes} of one shard, grouped as WebDataset does.

    Raises ShardReadError once, after the samples before the damage (the sample being read
    when the tar broke is dropped). Written here rather than using wds.tarfile_to_samples,
    whose handler sees one truncation twice (per member, then per shard) without the url, and
    because tarfile silently stops at a tar cut at a header or at a corrupted header (its
    checksum fails) as if the archive ended there: we check that only zeros follow where it stopped.
    """
    count, current = 0, {}
    try:
        with gopen(url, "rb") as raw_stream:
            stream = _EndTracker(raw_stream)
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    tar.members = []  # stream mode keeps every header otherwise
                    key, suffix = base_plus_ext(member.name)
                    if not member.isreg() or key is None or key.startswith("__"):
                        continue
                    if current and key != current["__key__"]:
                        yield current
                        count, current = count + 1, {}
                    current.setdefault("__key__", key)
                    current.setdefault("__url__", url)
                    current[suffix.lower()] = tar.extractfile(member).read()
                end = tar.offset  # where tarfile stopped: the end-of-archive marker, or a bad header
            while stream.read(1 << 16):  # the rest should be zeros
                pass
            if stream.data_end > end:
                raise tarfile.ReadError(f"corrupted member header at byte {end}")
            if stream.size - end < _TAR_END_MARKER:
                raise tarfile.ReadError("no end-of-archive marker (truncated)")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ShardReadError(url, count, err) from err
    if current:
        yield current


# --- choosing views -----------------------------------------------------------------------
def evenly_spaced_views(total: int, count: int, start: int = 0) -> list[int]:
    """`count` views spread evenly over an orbit of `total`, starting at `start` (e.g. 6 of 16)."""
    if not 1 <= count <= total:
        raise Nova3DError(f"cannot take {count} views of an orbit of {total}")
    return [(start + math.floor(k * total / count)) % total for k in range(count)]
