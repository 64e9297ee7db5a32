"""Writing an ObjectSample back to an object folder (the layout of nova3d.data.schema).

The inverse of nova3d.data.shards.read_object_folder: the arrays are written exactly (8-bit
RGBA and masks with PIL, 16-bit normals and depth with encode_png16), so reading the folder
back gives bit-identical arrays. The folder appears atomically (nova3d.atomic.staged_folder):
it is written as <name>.partial and swapped in once complete.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from nova3d.atomic import staged_folder
from nova3d.data import schema
from nova3d.data.png import encode_png16
from nova3d.data.shards import ObjectSample
from nova3d.errors import Nova3DError

_META_FIELDS = {f.name for f in dataclasses.fields(schema.ObjectMeta)}


def object_meta(sample: ObjectSample) -> schema.ObjectMeta:
    """meta.json for `sample`: its meta dict (unknown keys such as shard_encoding dropped), with
    the counts that must agree with the arrays taken from the arrays."""
    known = {k: v for k, v in sample.meta.items() if k in _META_FIELDS}
    known.update(object_id=sample.object_id, num_views=int(sample.mask.shape[0]),
                 resolution=int(sample.mask.shape[-1]), has_depth=sample.depth is not None)
    known.setdefault("source", "unknown")
    return schema.ObjectMeta(**known)


def write_object_sample(sample: ObjectSample, out: str | os.PathLike, *, parent: bool = False,
                        overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write `sample` as an object folder; returns the folder.

    out: the folder to create, or (parent=True) the folder to create it in, named
    safe_object_id(sample.object_id). `extra(partial_folder)` may add more files before the
    rename (they appear atomically with the rest). An existing folder is an error unless
    `overwrite`, when it is replaced only once the new one is complete.
    """
    out = Path(out)
    final = out / schema.safe_object_id(sample.object_id) if parent else out
    if final.exists() and not overwrite:
        raise Nova3DError(f"{final} already exists; remove it or choose another output folder")
    if sample.views is not None and list(sample.views) != list(range(len(sample.cameras))):
        raise Nova3DError(f"{final}: the sample holds views {sample.views} of {len(sample.cameras)}; "
                          "an object folder stores whole orbits")
    sample.validate()
    subdirs = [schema.RGB_DIR, schema.NORMAL_DIR, schema.MASK_DIR] + ([schema.DEPTH_DIR] if sample.depth is not None else [])
    with staged_folder(final) as partial:  # with overwrite, the old folder stays until the new one is whole
        for sub in subdirs:
            (partial / sub).mkdir()
        for i in range(sample.mask.shape[0]):
            name = schema.view_name(i)
            Image.fromarray(np.ascontiguousarray(sample.rgba[i].transpose(1, 2, 0)), "RGBA").save(partial / schema.RGB_DIR / name)
            (partial / schema.NORMAL_DIR / name).write_bytes(encode_png16(np.ascontiguousarray(sample.normal[i].transpose(1, 2, 0))))
            Image.fromarray(np.ascontiguousarray(sample.mask[i]), "L").save(partial / schema.MASK_DIR / name)
            if sample.depth is not None:
                (partial / schema.DEPTH_DIR / name).write_bytes(encode_png16(np.ascontiguousarray(sample.depth[i][..., None])))
        sample.cameras.save(partial / schema.CAMERAS_FILE)
        object_meta(sample).save(partial / schema.META_FILE)
        if extra is not None:
            extra(partial)
    return final
