"""Simulated generation errors on an object folder (issue 4: conflict maps and pose refinement
must earn their place; issue 5: `make demo` and the pose-sensitivity study).

`perturb_object(src, dst, cfg)` copies an object folder and
  * corrupts the colours of some non-input views, one kind per view, cycling over cfg.kinds:
      drift   a smooth per-view colour transform (hue rotation about the grey axis + RGB gains),
      blotch  soft-edged ellipses of a wrong colour inside the object,
      blur    a Gaussian blur of the object's colour (alpha-normalised: no background bleeds in);
    alpha, masks and normals are kept as they are;
  * moves the cameras.json poses of every non-input view by a random rotation (random axis)
    and translation, right-multiplied in the camera's own frame (c2w' = c2w @ T, the convention
    of nova3d.fusion.poses), while the images stay rendered from the true poses.
The output is a complete object folder (fusion reads it like any other) plus
  perturb/perturb.json        PerturbRecord: the config and what was applied to each view
  perturb/cameras_true.json   the unperturbed cameras
  perturb/corruption/NNN.png  L8, 255 where the corruption changed a colour channel by more
                              than cfg.change_threshold (8-bit levels) inside the object mask
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nova3d.atomic import write_json_atomic
from nova3d.cameras import Cameras
from nova3d.data.object_folder import write_object_sample
from nova3d.data.shards import ObjectSample, read_object_folder
from nova3d.errors import Nova3DError
from nova3d.fusion.poses import se3_from_vector

COLOR_KINDS = ("drift", "blotch", "blur")
POSE_MAGNITUDES = ("uniform", "max")
PERTURB_DIR = "perturb"
RECORD_FILE, TRUE_CAMERAS_FILE, CORRUPTION_DIR = "perturb.json", "cameras_true.json", "corruption"


@dataclass
class PerturbConfig:
    color_views: list[int] = field(default_factory=lambda: [3, 6, 10, 13])  # never the input view
    kinds: list[str] = field(default_factory=lambda: list(COLOR_KINDS))  # cycled over color_views
    drift_hue_deg: float = 35.0  # hue rotation, random sign, |angle| in [0.5, 1] x this
    drift_gain: float = 0.25  # per-channel gains drawn from 1 +- this
    blotch_count: int = 4
    blotch_size: float = 0.12  # largest ellipse semi-axis, fraction of the image side
    blur_sigma: float = 0.02  # Gaussian sigma, fraction of the image side (5 px at 256²)
    change_threshold: int = 12  # 8-bit levels: larger changes are marked in perturb/corruption/
    pose_rotation_deg: float = 0.0  # largest rotation of a non-input view's camera (random axis)
    pose_translation: float = 0.0  # largest camera shift, fraction of the camera radius
    pose_magnitude: str = "uniform"  # "uniform": U(0, max) per view; "max": every view by the max
    seed: int = 0

    def check(self, num_views: int, input_view: int, where: str = "perturb") -> None:
        """Nova3DError naming the bad setting."""
        bad = [v for v in self.color_views if not 0 <= v < num_views]
        if bad:
            raise Nova3DError(f"{where}: color views {bad} out of range for {num_views} views")
        if input_view in self.color_views:
            raise Nova3DError(f"{where}: view {input_view} is the input view and is never corrupted")
        if len(set(self.color_views)) != len(self.color_views):
            raise Nova3DError(f"{where}: color views {self.color_views} repeat a view")
        unknown = [k for k in self.kinds if k not in COLOR_KINDS]
        if unknown or (self.color_views and not self.kinds):
            raise Nova3DError(f"{where}: corruption kinds {self.kinds} must be some of {list(COLOR_KINDS)}")
        if self.pose_magnitude not in POSE_MAGNITUDES:
            raise Nova3DError(f"{where}: pose_magnitude {self.pose_magnitude!r} is not one of {list(POSE_MAGNITUDES)}")
        for name in ("drift_hue_deg", "drift_gain", "blotch_size", "blur_sigma", "pose_rotation_deg",
                     "pose_translation", "blotch_count", "change_threshold"):
            if getattr(self, name) < 0:
                raise Nova3DError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.pose_rotation_deg > 180:
            raise Nova3DError(f"{where}: pose_rotation_deg must be <= 180, got {self.pose_rotation_deg}")


@dataclass
class PerturbRecord:
    """perturb/perturb.json: what perturb_object did; lists are per view (index = view)."""

    source: str
    input_view: int
    config: dict
    view_kinds: list  # corruption kind of each view, None where untouched
    rotation_deg: list[float]  # applied camera rotation
    translation: list[float]  # applied camera-centre shift, world units
    corrupted_fraction: list[float]  # share of the view's mask pixels marked in perturb/corruption/

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / PERTURB_DIR / RECORD_FILE
        write_json_atomic(path, dataclasses.asdict(self))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "PerturbRecord":
        """From an object folder written by perturb_object (or the perturb.json itself)."""
        path = Path(folder)
        if path.is_dir():
            path = path / PERTURB_DIR / RECORD_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise Nova3DError(f"{path}: not a readable perturb record ({err})") from err


# --- colour corruptions: float [3, H, W] straight colour, alpha [H, W] -> [3, H, W] ----------
def _hue_rotation(deg: float) -> torch.Tensor:
    """[3, 3] rotation of RGB about the grey axis: turns hues, keeps greys."""
    k = torch.full((3,), 1 / math.sqrt(3.0))
    return se3_from_vector(torch.cat([k * math.radians(deg), torch.zeros(3)]))[:3, :3]


def color_drift(rgb: torch.Tensor, rng: np.random.Generator, hue_deg: float, gain: float) -> torch.Tensor:
    angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * hue_deg)
    gains = torch.as_tensor(rng.uniform(1 - gain, 1 + gain, 3), dtype=torch.float32)
    out = torch.einsum("ij,jhw->ihw", _hue_rotation(angle), rgb) * gains[:, None, None]
    return out.clamp(0, 1)


def blotches(rgb: torch.Tensor, inside: torch.Tensor, rng: np.random.Generator, count: int,
             size: float) -> torch.Tensor:
    """`count` soft-edged ellipses of random colours centred on random `inside` pixels."""
    H, W = inside.shape
    ys, xs = np.nonzero(inside.numpy())
    if len(ys) == 0 or count == 0:
        return rgb
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5,
                            indexing="ij")
    out = rgb.clone()
    for _ in range(count):
        i = rng.integers(len(ys))
        cy, cx = ys[i] + 0.5, xs[i] + 0.5
        a, b = rng.uniform(0.5, 1.0, 2) * size * max(H, W)
        th = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
        v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
        d = torch.sqrt((u / max(a, 0.5)) ** 2 + (v / max(b, 0.5)) ** 2)
        w = ((1 - d) / 0.4).clamp(0, 1)
        w = w * w * (3 - 2 * w)  # smoothstep: a soft edge over the outer 40% of the radius
        color = torch.as_tensor(rng.uniform(0, 1, 3), dtype=torch.float32)[:, None, None]
        out = out * (1 - w) + color * w
    return out


def gaussian_blur(rgb: torch.Tensor, alpha: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Blur of the object's colour: G*(alpha rgb) / G*alpha, so the background does not bleed in."""
    if sigma_px <= 0:
        return rgb
    r = max(1, math.ceil(3 * sigma_px))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma_px) ** 2)
    g = g / g.sum()
    stack = torch.cat([rgb * alpha, alpha[None]])[None]  # [1, 4, H, W]
    for kernel in (g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)):  # separable: rows, then columns
        pad = (r, r, 0, 0) if kernel.shape[-1] > 1 else (0, 0, r, r)
        stack = F.conv2d(F.pad(stack, pad, mode="replicate"), kernel.expand(4, 1, *kernel.shape[-2:]), groups=4)
    return (stack[0, :3] / stack[0, 3:].clamp_min(1e-6)).clamp(0, 1)


def corrupt_view(rgba: np.ndarray, mask: np.ndarray, kind: str, cfg: PerturbConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """rgba [4, H, W] uint8, mask [H, W] uint8 -> (corrupted rgba [4, H, W] uint8, corruption
    mask [H, W] uint8 (255 = changed by more than cfg.change_threshold, inside `mask`)).
    Only pixels with alpha > 0 change; alpha itself never does."""
    rgb = torch.as_tensor(rgba[:3], dtype=torch.float32) / 255
    alpha = torch.as_tensor(rgba[3], dtype=torch.float32) / 255
    if kind == "drift":
        new = color_drift(rgb, rng, cfg.drift_hue_deg, cfg.drift_gain)
    elif kind == "blotch":
        new = blotches(rgb, torch.as_tensor(mask > 0), rng, cfg.blotch_count, cfg.blotch_size)
    elif kind == "blur":
        new = gaussian_blur(rgb, alpha, cfg.blur_sigma * rgba.shape[-1])
    else:
        raise Nova3DError(f"perturb: unknown corruption kind {kind!r}; expected one of {list(COLOR_KINDS)}")
    out = rgba.copy()
    quantised = (new * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    on = rgba[3] > 0
    out[:3, on] = quantised[:, on]
    changed = np.abs(out[:3].astype(np.int16) - rgba[:3].astype(np.int16)).max(0) > cfg.change_threshold
    return out, ((changed & (mask > 0)) * 255).astype(np.uint8)


# --- pose errors ---------------------------------------------------------------------------
def perturb_poses(cameras: Cameras, cfg: PerturbConfig) -> tuple[torch.Tensor, list[float], list[float]]:
    """(perturbed c2w [V, 4, 4], rotation deg [V], translation world units [V]); the input view
    and, when both maxima are 0, every view keep their pose exactly."""
    V = len(cameras)
    c2w = cameras.c2w.clone()
    rot, shift = [0.0] * V, [0.0] * V
    if cfg.pose_rotation_deg == 0 and cfg.pose_translation == 0:
        return c2w, rot, shift
    for v in range(V):
        if v == cameras.input_view:
            continue
        rng = np.random.default_rng([cfg.seed, 2, v])  # per view: independent of the other settings
        scale = (lambda: 1.0) if cfg.pose_magnitude == "max" else (lambda: float(rng.uniform()))
        axis, direction = rng.normal(size=3), rng.normal(size=3)
        rot[v] = cfg.pose_rotation_deg * scale()
        shift[v] = cfg.pose_translation * cameras.radius * scale()
        omega = axis / np.linalg.norm(axis) * math.radians(rot[v])
        tau = direction / np.linalg.norm(direction) * shift[v]
        T = se3_from_vector(torch.as_tensor(np.concatenate([omega, tau]), dtype=torch.float64))
        c2w[v] = (cameras.c2w[v].double() @ T).float()  # right-multiplied: in the camera's own frame
    return c2w, rot, shift


def perturb_object(src_folder: str | os.PathLike, dst_folder: str | os.PathLike,
                   cfg: PerturbConfig = PerturbConfig(), overwrite: bool = False) -> PerturbRecord:
    """Copy the object folder `src_folder` to `dst_folder` with simulated generation errors
    (module docstring); returns the record also written to dst/perturb/perturb.json."""
    src, dst = Path(src_folder), Path(dst_folder)
    if not src.is_dir():
        raise Nova3DError(f"{src}: not an object folder")
    sample = read_object_folder(src)
    cams = sample.cameras
    V = len(cams)
    cfg.check(V, cams.input_view, where=str(src))
    if dst.exists() and not overwrite:
        raise Nova3DError(f"{dst} already exists; remove it or choose another output folder")
    rgba = sample.rgba.copy()
    corruption = np.zeros_like(sample.mask)
    kinds: list = [None] * V
    for n, v in enumerate(cfg.color_views):
        kinds[v] = cfg.kinds[n % len(cfg.kinds)]
        rgb_rng = np.random.default_rng([cfg.seed, 1, v])
        rgba[v], corruption[v] = corrupt_view(sample.rgba[v], sample.mask[v], kinds[v], cfg, rgb_rng)
    c2w, rot, shift = perturb_poses(cams, cfg)
    perturbed = dataclasses.replace(cams, c2w=c2w, extra={**cams.extra, "perturbed": True})
    inside = np.maximum((sample.mask > 0).sum((1, 2)), 1)
    record = PerturbRecord(source=str(src.resolve()), input_view=cams.input_view, config=dataclasses.asdict(cfg),
                           view_kinds=kinds, rotation_deg=rot, translation=shift,
                           corrupted_fraction=[float(f) for f in (corruption > 0).sum((1, 2)) / inside])
    meta = dict(sample.meta)
    meta["settings"] = {**meta.get("settings", {}), "perturbed_from": str(src.resolve())}
    out = ObjectSample(sample.object_id, rgba, sample.normal, sample.mask, perturbed, meta, sample.depth)

    def add_perturb_files(folder: Path) -> None:
        (folder / PERTURB_DIR / CORRUPTION_DIR).mkdir(parents=True)
        for v in range(V):
            Image.fromarray(corruption[v], "L").save(folder / PERTURB_DIR / CORRUPTION_DIR / f"{v:03d}.png")
        cams.save(folder / PERTURB_DIR / TRUE_CAMERAS_FILE)
        record.save(folder)

    write_object_sample(out, dst, overwrite=overwrite, extra=add_perturb_files)
    return record


CORRUPTION_MASKS = f"{PERTURB_DIR}/{CORRUPTION_DIR}"  # relative to the object folder


def load_corruption_masks(folder: str | os.PathLike, masks: str = CORRUPTION_MASKS) -> np.ndarray:
    """[V, H, W] bool: the masks under `masks` (default perturb/corruption/) of a folder written
    by perturb_object."""
    folder = Path(folder)
    files = sorted((folder / masks).glob("*.png"))
    if not files:
        raise Nova3DError(f"{folder / masks}: no corruption masks")
    return np.stack([np.asarray(Image.open(f)) > 0 for f in files])
