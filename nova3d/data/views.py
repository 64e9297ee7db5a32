"""From stored views (ObjectSample) to model-ready tensors: view subset and orbit roll,
resize, compositing on a background, normals re-expressed in the requested frame; and the
batch dataclass with its collate function.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from nova3d.cameras import NORMAL_FRAMES, convert_normal_frame, scale_intrinsics
from nova3d.data.shards import ObjectSample


@dataclass
class MultiViewSample:
    """One object's views, ready for the model. View 0 is the input view."""

    object_id: str
    input_image: Tensor  # [3, H, W] in [0, 1]: rgb[0]
    rgb: Tensor  # [V, 3, H, W] in [0, 1], composited on `background`
    normals: Tensor  # [V, 3, H, W] in [-1, 1]: unit normals on the object, 2 * background - 1 elsewhere
    masks: Tensor  # [V, 1, H, W] in [0, 1] (fractional at edges after resizing)
    c2w: Tensor  # [V, 4, 4] opengl camera-to-world (nova3d.cameras)
    K: Tensor  # [V, 3, 3] intrinsics in pixels of the resized image
    azimuth_deg: Tensor  # [V]
    elevation_deg: Tensor  # [V]
    view_indices: Tensor  # [V] long: the stored orbit's view index of each view
    background: Tensor  # [3] in [0, 1]


@dataclass
class MultiViewBatch:
    """A batch of MultiViewSample (B first). Lightning moves it with `to` (it is _TransferableDataType)."""

    object_ids: list[str]
    input_image: Tensor  # [B, 3, H, W]
    rgb: Tensor  # [B, V, 3, H, W]
    normals: Tensor  # [B, V, 3, H, W]
    masks: Tensor  # [B, V, 1, H, W]
    c2w: Tensor  # [B, V, 4, 4]
    K: Tensor  # [B, V, 3, 3]
    azimuth_deg: Tensor  # [B, V]
    elevation_deg: Tensor  # [B, V]
    view_indices: Tensor  # [B, V]
    background: Tensor  # [B, 3]
    # [B, D, V, 2*C, h, w] float32: the frozen VAE's posterior (mean, logvar), unscaled, of each domain
    # video (schema.LATENT_DOMAINS order) when the shards cache it (nova3d.data.latent_cache); None: encode.
    latent_params: Tensor | None = None

    def __len__(self) -> int:
        return len(self.object_ids)

    def _map(self, fn) -> "MultiViewBatch":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MultiViewBatch":
        """Every tensor field on `device` (what Lightning's move_data_to_device calls)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MultiViewBatch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map(Tensor.pin_memory)


def collate_multiview(samples: Sequence[MultiViewSample]) -> MultiViewBatch:
    """Stack samples with the same view count and resolution into a MultiViewBatch.

    default_collate stacks straight into shared memory inside a DataLoader worker, which saves
    the copy that sending the batch to the main process would otherwise make; a single sample
    in the main process needs no copy at all (~70 ms for 16 views at 512²).
    """
    fields = {f.name for f in dataclasses.fields(MultiViewSample)} - {"object_id"}
    if len(samples) == 1 and get_worker_info() is None:
        stack = lambda tensors: tensors[0].unsqueeze(0)  # noqa: E731
    else:
        stack = default_collate
    return MultiViewBatch(object_ids=[s.object_id for s in samples],
                          **{name: stack([getattr(s, name) for s in samples]) for name in fields})


class Scratch:
    """Temporary buffers kept between samples: a new 50 MB buffer costs ~10 ms of page faults."""

    def __init__(self):
        self._buffers: dict[str, Tensor] = {}

    def take(self, slot: str, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised float32 tensor of `shape` on `device`, reusing the memory of the last `slot`."""
        numel = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < numel or buf.device != torch.device(device):
            buf = self._buffers[slot] = torch.empty(numel, device=device)
        return buf[:numel].view(*shape)


@dataclass
class PackedViews:
    """A MultiViewSample before compositing, as a DataLoader worker hands it over: the stored
    pixels of the picked views (orbit already rolled) in their compact dtypes (~3x less than
    float32), plus what `composite` needs. `unpack_batch` turns a batch of them into a MultiViewBatch."""

    object_id: str
    rgba: Tensor  # [V, 4, S, S] uint8: straight RGB + coverage alpha, at the stored resolution S
    normal: Tensor  # [V, 3, S, S] uint16: (n + 1) / 2 * 65535 in the stored frame
    mask: Tensor  # [V, S, S] uint8: 255 = object
    rot: Tensor  # [V, 3, 3] float: stored frame -> requested normal frame
    c2w: Tensor  # [V, 4, 4]
    K: Tensor  # [V, 3, 3] intrinsics in pixels of the resized image
    azimuth_deg: Tensor  # [V]
    elevation_deg: Tensor  # [V]
    view_indices: Tensor  # [V] long
    background: Tensor  # [3] in [0, 1]
    resolution: int  # output resolution
    latent_params: Tensor | None = None  # [D, V, 2*C, h, w] float16 cached posterior, or None


@dataclass
class PackedBatch:
    """A batch of PackedViews (B first). Moves like MultiViewBatch (`to`, `pin_memory`); the
    DataModule's on_after_batch_transfer makes the MultiViewBatch on the target device."""

    object_ids: list[str]
    rgba: Tensor  # [B, V, 4, S, S] uint8
    normal: Tensor  # [B, V, 3, S, S] uint16
    mask: Tensor  # [B, V, S, S] uint8
    rot: Tensor  # [B, V, 3, 3]
    c2w: Tensor  # [B, V, 4, 4]
    K: Tensor  # [B, V, 3, 3]
    azimuth_deg: Tensor  # [B, V]
    elevation_deg: Tensor  # [B, V]
    view_indices: Tensor  # [B, V]
    background: Tensor  # [B, 3]
    resolution: int
    latent_params: Tensor | None = None  # [B, D, V, 2*C, h, w] float16, or None

    __len__ = MultiViewBatch.__len__
    _map = MultiViewBatch._map
    to = MultiViewBatch.to
    pin_memory = MultiViewBatch.pin_memory


def collate_packed(samples: Sequence[PackedViews]) -> PackedBatch:
    """Stack PackedViews with the same view count and resolutions (into shared memory in a worker)."""
    if len({s.resolution for s in samples}) != 1:
        raise ValueError("samples of one batch must share their output resolution")
    fields = {f.name for f in dataclasses.fields(PackedViews)} - {"object_id", "resolution", "latent_params"}
    if len(samples) == 1 and get_worker_info() is None:
        stack = lambda tensors: tensors[0].unsqueeze(0)  # noqa: E731
    else:
        stack = default_collate
    cached = [s.latent_params for s in samples]  # a batch uses the cache only if every sample has it
    return PackedBatch(object_ids=[s.object_id for s in samples], resolution=samples[0].resolution,
                       latent_params=None if any(c is None for c in cached) else stack(cached),
                       **{name: stack([getattr(s, name) for s in samples]) for name in fields})


def unpack_batch(batch: PackedBatch, scratch: Scratch | None = None) -> MultiViewBatch:
    """The MultiViewBatch of a PackedBatch, computed on the batch's device (the one function that
    composites for the loaders; make_views uses the same `composite`)."""
    rgb, normals, masks = composite(batch.rgba, batch.normal, batch.mask, batch.rot, batch.background,
                                    batch.resolution, scratch)
    return MultiViewBatch(object_ids=list(batch.object_ids), input_image=rgb[:, 0].clone(), rgb=rgb,
                          normals=normals, masks=masks, c2w=batch.c2w, K=batch.K, azimuth_deg=batch.azimuth_deg,
                          elevation_deg=batch.elevation_deg, view_indices=batch.view_indices,
                          background=batch.background.float(),
                          latent_params=None if batch.latent_params is None else batch.latent_params.float())


def normal_rotation(c2w: Tensor, src: str, dst: str, input_view: int = 0) -> Tensor:
    """[V, 3, 3] matrices M with n_dst = M @ n_src for the views c2w [V, 4, 4] (cameras.py frames)."""
    basis = torch.eye(3).expand(c2w.shape[0], 3, 3)  # row i is e_i, so the result's rows are M e_i
    return convert_normal_frame(basis, c2w.float(), src, dst, input_view).transpose(-1, -2)


def pack_views(obj: ObjectSample, views: Sequence[int], *, resolution: int, normal_frame: str,
               background: Tensor) -> PackedViews:
    """`obj`'s stored views `views` (views[0] becomes the input view), not yet composited.

    `obj` must hold those views (all of them, or decode_sample(raw, views) with the same list).
    background: [3] in [0, 1]. Normals are to be re-expressed in `normal_frame` of the new orbit.
    """
    if normal_frame not in NORMAL_FRAMES:
        raise ValueError(f"unknown normal frame {normal_frame!r}; expected one of {NORMAL_FRAMES}")
    held = obj.views if obj.views is not None else list(range(len(obj.cameras)))
    pick = [held.index(v) for v in views]  # ValueError when obj lacks a view
    idx = torch.as_tensor(list(views), dtype=torch.long)
    full = obj.cameras
    # Stored frame -> world is defined on the stored orbit; world -> `normal_frame` on the new one.
    to_world = normal_rotation(full.c2w, full.normal_frame, "world", full.input_view)[idx]
    c2w = full.c2w[idx]
    rot = normal_rotation(c2w, "world", normal_frame, 0) @ to_world
    every = pick == list(range(obj.rgba.shape[0]))  # obj holds exactly these views: no gather copy
    take = (lambda a: torch.from_numpy(a)) if every else (lambda a: torch.from_numpy(a[pick]))  # noqa: E731
    size = obj.rgba.shape[-1]
    return PackedViews(
        object_id=obj.object_id, rgba=take(obj.rgba), normal=take(obj.normal), mask=take(obj.mask), rot=rot.float(),
        c2w=c2w.float(), K=scale_intrinsics(full.K[idx].float(), resolution / size),
        azimuth_deg=full.azimuth_deg[idx], elevation_deg=full.elevation_deg[idx], view_indices=idx,
        background=background.float().clone(), resolution=int(resolution))


def make_views(obj: ObjectSample, views: Sequence[int], *, resolution: int, normal_frame: str,
               background: Tensor, scratch: Scratch | None = None) -> MultiViewSample:
    """Model tensors of `obj`'s stored views `views` (views[0] becomes the input view).

    `obj` must hold those views (all of them, or decode_sample(raw, views) with the same list).
    background: [3] in [0, 1]. Normals are re-expressed in `normal_frame` of the new orbit.
    scratch: temporary buffers to reuse across calls.
    """
    p = pack_views(obj, views, resolution=resolution, normal_frame=normal_frame, background=background)
    rgb, normals, mask = composite(p.rgba, p.normal, p.mask, p.rot, p.background, p.resolution, scratch)
    return MultiViewSample(
        object_id=p.object_id, input_image=rgb[0].clone(), rgb=rgb, normals=normals, masks=mask, c2w=p.c2w,
        K=p.K, azimuth_deg=p.azimuth_deg, elevation_deg=p.elevation_deg, view_indices=p.view_indices,
        background=p.background)


def composite(rgba: Tensor, normal: Tensor, mask: Tensor, rot: Tensor, background: Tensor, resolution: int,
              scratch: Scratch | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """rgb, normals [..., V, 3, R, R] and masks [..., V, 1, R, R] (float, on the inputs' device) of
    stored views rgba [..., V, 4, S, S] uint8, normal [..., V, 3, S, S] uint16, mask [..., V, S, S]
    uint8, with normals rotated by rot [..., V, 3, 3], composited on background [..., 3].

    Colour and normals are premultiplied by their coverage before resizing, so edges never mix
    in the stored background. In-place ops on whole planes: at 16 x 512² this is the DataModule's
    main cost (`norm(dim=1)` alone took 0.5 s; new buffers cost page faults).
    """
    lead, S, dev = rgba.shape[:-3], rgba.shape[-1], rgba.device
    N, R = math.prod(lead), resolution
    scratch = scratch or Scratch()
    rgba, mask8 = rgba.reshape(N, 4, S, S), mask.reshape(N, 1, S, S)
    bg = background.float().unsqueeze(-2).expand(*lead, 3).reshape(N, 3, 1, 1)
    alpha = scratch.take("alpha", (N, 1, S, S), dev).copy_(rgba[:, 3:]).mul_(1 / 255)
    rgb = torch.empty((N, 3, S, S), device=dev).copy_(rgba[:, :3]).mul_(alpha).mul_(1 / 255)  # premultiplied
    mask = torch.empty((N, 1, S, S), device=dev).copy_(mask8).mul_(1 / 255)
    normal = scratch.take("normal", (N, 3, S, S), dev).copy_(normal.reshape(N, 3, S, S))
    normal.mul_(2 / 65535).sub_(1).mul_(mask)
    if R != S:
        stack = F.interpolate(torch.cat([rgb, alpha, normal, mask], dim=1), size=(R, R),
                              mode="bilinear", antialias=True, align_corners=False)
        rgb, alpha, normal, mask = (stack[:, :3].contiguous(), stack[:, 3:4], stack[:, 4:7],
                                    stack[:, 7:].contiguous())
    normal = torch.bmm(rot.float().reshape(N, 3, 3), normal.reshape(N, 3, -1)).view(N, 3, R, R)
    plane = torch.mul(normal[:, 0], normal[:, 0], out=scratch.take("plane", (N, R, R), dev))
    plane.addcmul_(normal[:, 1], normal[:, 1]).addcmul_(normal[:, 2], normal[:, 2])
    normal.mul_(plane.clamp_min_(1e-16).rsqrt_().unsqueeze(1).mul_(mask))  # unit, times coverage
    uncovered = plane.copy_(mask[:, 0]).neg_().add_(1).unsqueeze(1)
    normal.addcmul_(uncovered, bg.mul(2).sub_(1)).clamp_(-1, 1)
    rgb.addcmul_(alpha.neg_().add_(1), bg).clamp_(0, 1)
    return rgb.view(*lead, 3, R, R), normal.view(*lead, 3, R, R), mask.view(*lead, 1, R, R)
