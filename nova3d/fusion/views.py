"""The views one fusion run fits: an object folder (rendered or generated) checked and held as
tensors, and random ray batches drawn from it.

Everything fusion needs is validated here, before any optimisation starts: the folder layout
(missing views or cameras), image sizes against cameras.json, non-finite values, empty masks.
Normals are re-expressed in the world frame once (they are stored in the frame cameras.json
names); colours are straight RGB composited on white, the background the renderer uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nova3d.cameras import Cameras, convert_normal_frame, decode_normals
from nova3d.data.sample_error import SampleError
from nova3d.data.shards import read_object_folder
from nova3d.errors import Nova3DError

MIN_MASK_PIXELS = 16  # fewer object pixels than this in a view: nothing to fit there


class FusionInputError(Nova3DError):
    """An object folder fusion cannot use; the message names the file and the problem."""


@dataclass
class FusionViews:
    """One object's views as float tensors (on any device)."""

    object_id: str
    rgb: Tensor  # [V, 3, H, W] in [0, 1], composited on white
    normal: Tensor  # [V, 3, H, W] unit world-frame normals (0 outside the mask)
    mask: Tensor  # [V, H, W] in {0, 1}
    cameras: Cameras  # as stored (poses may be wrong: fusion refines them)
    folder: Path
    # [V, H, W] in [0, 1]: the true corruption of each pixel where it is known (nova3d.fusion.
    # supervision attaches it for loss.conflict_supervision); None for ordinary folders.
    corruption: Tensor | None = None

    @property
    def num_views(self) -> int:
        return self.rgb.shape[0]

    @property
    def resolution(self) -> int:
        return self.rgb.shape[-1]

    def to(self, device: torch.device | str) -> "FusionViews":
        c = self.cameras
        cams = Cameras(c.c2w.to(device), c.K.to(device), c.width, c.height, c.azimuth_deg, c.elevation_deg,
                       c.radius, c.fov_deg, c.normal_frame, c.input_view, dict(c.extra))
        corruption = None if self.corruption is None else self.corruption.to(device)
        return FusionViews(self.object_id, self.rgb.to(device), self.normal.to(device), self.mask.to(device),
                           cams, self.folder, corruption)

    def downsample(self, resolution: int) -> "FusionViews":
        """The same views at a lower square resolution (area averaging; intrinsics rescaled)."""
        if resolution == self.resolution:
            return self
        if resolution > self.resolution:
            raise FusionInputError(f"{self.folder}: cannot fit at {resolution}² from {self.resolution}² views")
        pool = lambda x: torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="area")
        scale = resolution / self.resolution
        c = self.cameras
        K = c.K.clone()
        K[:, :2] *= scale
        cams = Cameras(c.c2w, K, resolution, resolution, c.azimuth_deg, c.elevation_deg, c.radius, c.fov_deg,
                       c.normal_frame, c.input_view, dict(c.extra))
        normal = torch.nn.functional.normalize(pool(self.normal), dim=1)
        mask = (pool(self.mask[:, None])[:, 0] >= 0.5).float()
        # the share of each low-resolution pixel that was corrupted: a soft target
        corruption = None if self.corruption is None else pool(self.corruption[:, None])[:, 0]
        return FusionViews(self.object_id, pool(self.rgb), normal * mask[:, None], mask, cams, self.folder, corruption)


def load_views(folder: str | Path) -> FusionViews:
    """Read and check an object folder; FusionInputError names the file and what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FusionInputError(f"{folder}: not a folder of views")
    try:
        sample = read_object_folder(folder)
    except SampleError as err:
        raise FusionInputError(str(err) if str(folder) in str(err) else f"{folder}: {err}") from err
    cams = sample.cameras
    if cams.input_view != 0:
        raise FusionInputError(f"{folder / 'cameras.json'}: input_view is {cams.input_view}; fusion expects "
                               "the input view first (view 0)")
    mask = torch.from_numpy(sample.mask.astype(np.float32) / 255.0).round()
    alpha = torch.from_numpy(sample.rgba[:, 3:].astype(np.float32) / 255.0)
    rgb = torch.from_numpy(sample.rgba[:, :3].astype(np.float32) / 255.0) * alpha + (1.0 - alpha)
    encoded = torch.from_numpy(sample.normal.astype(np.float32) / 65535.0)
    normal = decode_normals(encoded.permute(0, 2, 3, 1))
    normal = convert_normal_frame(normal, cams.c2w.float(), cams.normal_frame, "world", cams.input_view)
    normal = normal.permute(0, 3, 1, 2) * mask[:, None]
    counts = mask.flatten(1).sum(1)
    empty = [i for i, n in enumerate(counts.tolist()) if n < MIN_MASK_PIXELS]
    if empty:
        raise FusionInputError(f"{folder / 'mask'}: views {empty} have (almost) empty masks "
                               f"(< {MIN_MASK_PIXELS} object pixels)")
    for name, t in (("rgb", rgb), ("normal", normal)):
        if not torch.isfinite(t).all():
            raise FusionInputError(f"{folder / name}: non-finite values")
    return FusionViews(sample.object_id, rgb, normal, mask, cams, folder)


@dataclass
class RayBatch:
    """Pixels drawn from the views: where they are and what they should look like."""

    view: Tensor  # [N] long
    pix: Tensor  # [N, 2] pixel coordinates (x right, y down; pixel-edge origin)
    rgb: Tensor  # [N, 3] on white
    normal: Tensor  # [N, 3] world frame (0 outside the mask)
    mask: Tensor  # [N] in {0, 1}
    corruption: Tensor | None = None  # [N] in [0, 1] where the views carry it


class RaySampler:
    """Uniform pixels over all views, with a share drawn from a dilated object region.

    Most of a 256² view is empty background, whose rays the occupancy grid makes cheap but
    which teach little once the silhouette is right; `object_fraction` of every batch comes
    from the object's mask dilated by a few pixels (so edges are well sampled on both sides).
    """

    def __init__(self, views: FusionViews, object_fraction: float = 0.5, dilate: int = 4):
        self.views = views
        V, H, W = views.mask.shape
        region = torch.nn.functional.max_pool2d(views.mask[:, None], 2 * dilate + 1, 1, dilate)[:, 0] > 0
        self.region_index = region.flatten().nonzero()[:, 0]
        self.object_fraction = object_fraction
        self.shape = (V, H, W)

    def sample(self, n: int, generator: torch.Generator | None = None, jitter: bool = True) -> RayBatch:
        V, H, W = self.shape
        device = self.views.rgb.device
        n_obj = int(n * self.object_fraction)
        g = generator
        flat_all = torch.randint(0, V * H * W, (n - n_obj,), generator=g, device=g.device if g else "cpu")
        pick = torch.randint(0, len(self.region_index), (n_obj,), generator=g, device=g.device if g else "cpu")
        flat = torch.cat([flat_all, self.region_index.to(flat_all.device)[pick]]).to(device)
        view, rest = flat // (H * W), flat % (H * W)
        row, col = rest // W, rest % W
        # Jitter inside the pixel: the colour target is the pixel's average anyway.
        offset = (torch.rand(n, 2, generator=g, device=g.device if g else "cpu").to(device) if jitter
                  else torch.full((n, 2), 0.5, device=device))
        pix = torch.stack([col, row], dim=-1).float() + offset
        v = self.views
        corruption = None if v.corruption is None else v.corruption[view, row, col]
        return RayBatch(view, pix, v.rgb[view, :, row, col], v.normal[view, :, row, col], v.mask[view, row, col],
                        corruption)


def pixel_centres(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """[H*W, 2] the centres of every pixel of a view, row-major."""
    j, i = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([i, j], dim=-1).reshape(-1, 2).float() + 0.5
