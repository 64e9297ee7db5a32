"""The one camera and normal-map convention of nova3d.

World frame
    Blender's: right-handed, +Z up, the object's front faces -Y. Objects are
    normalised to a unit bounding box (longest side 1) centred at the origin.

Camera axes ("opengl", identical to Blender's camera objects)
    x right, y up, the camera looks down -z. A camera pose is a camera-to-world
    matrix ``c2w`` [4, 4]; its columns are the camera axes and position in world.
    ``convert_c2w`` turns it into OpenCV axes (x right, y down, looking down +z),
    which is what pytorch3d's ``cameras_from_opencv_projection`` takes.

Orbit
    View k sits at azimuth ``start + 360/V * k`` and the given elevation, on a sphere
    of ``radius`` around the origin, looking at the origin. Azimuth 0 is the front
    (camera on -Y); azimuth grows counter-clockwise seen from above (90 deg is +X).
    View 0 is the input view.

Intrinsics
    Pinhole, square pixels, principal point at the image centre, in pixels. Pixel
    (col i, row j) covers [i, i+1) x [j, j+1); its centre is (i + 0.5, j + 0.5);
    rows grow downwards.

Normal maps
    Unit normals expressed in a named frame: "world", "view" (each view's own
    camera axes) or "input_view" (the camera axes of view ``input_view``, default 0;
    the frame of our shards and of generated views). A surface facing the camera
    has normal +z in its view frame. Stored as ``(n + 1) / 2``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from nova3d.atomic import write_json_atomic
from nova3d.errors import Nova3DError

CAMERA_CONVENTIONS = ("opengl", "blender", "opencv")
NORMAL_FRAMES = ("world", "view", "input_view")
# Flips the camera's y and z axes: OpenGL/Blender <-> OpenCV (its own inverse).
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass(frozen=True)
class OrbitSpec:
    """Where the views of one object are taken from (DESIGN.md §4 defaults)."""

    num_views: int = 16
    elevation_deg: float | tuple[float, ...] = 0.0  # one value, or one per view
    start_azimuth_deg: float = 0.0
    radius: float = 1.5
    fov_deg: float = 49.1
    resolution: int = 256


@dataclass
class Cameras:
    """The cameras of one object's views. c2w: [V, 4, 4] (opengl axes), K: [V, 3, 3]."""

    c2w: Tensor
    K: Tensor
    width: int
    height: int
    azimuth_deg: Tensor  # [V]
    elevation_deg: Tensor  # [V]
    radius: float
    fov_deg: float
    normal_frame: str = "input_view"
    input_view: int = 0
    extra: dict = field(default_factory=dict)  # free-form provenance kept in cameras.json

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def select(self, indices: Sequence[int] | Tensor) -> "Cameras":
        """The cameras of the given views, in that order (view indices[0] becomes view 0).

        `input_view` follows the input view to its new position. Dropping the input view while
        normal_frame is "input_view" is an error: the frame the normals are in would be lost
        (convert them to "world" first).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        kept = (idx == self.input_view).nonzero()
        if len(kept) == 0 and self.normal_frame == "input_view":
            raise ValueError(f"selecting views {idx.tolist()} drops input view {self.input_view}, "
                             "whose frame the normals are in; convert them to 'world' first")
        input_view = int(kept[0]) if len(kept) else 0
        return Cameras(self.c2w[idx], self.K[idx], self.width, self.height,
                       self.azimuth_deg[idx], self.elevation_deg[idx], self.radius,
                       self.fov_deg, self.normal_frame, input_view, dict(self.extra))

    def roll(self, start: int) -> "Cameras":
        """The same orbit started at view `start`."""
        return self.select(orbit_order(len(self), start))

    def to_json(self) -> dict:
        return {
            "convention": "opengl",
            "world_up": "+z",
            "width": self.width,
            "height": self.height,
            "fov_deg": self.fov_deg,
            "radius": self.radius,
            "normal_frame": self.normal_frame,
            "input_view": self.input_view,
            "frames": [
                {"index": i, "azimuth_deg": float(self.azimuth_deg[i]),
                 "elevation_deg": float(self.elevation_deg[i]),
                 "c2w": self.c2w[i].tolist(), "K": self.K[i].tolist()}
                for i in range(len(self))
            ],
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Cameras":
        """Cameras from parsed cameras.json; CamerasFileError (check_cameras_json) if unusable."""
        check_cameras_json(data)
        frames = data["frames"]
        return cls(
            c2w=torch.tensor([f["c2w"] for f in frames], dtype=torch.float32),
            K=torch.tensor([f["K"] for f in frames], dtype=torch.float32),
            width=int(data["width"]), height=int(data["height"]),
            azimuth_deg=torch.tensor([f["azimuth_deg"] for f in frames], dtype=torch.float32),
            elevation_deg=torch.tensor([f["elevation_deg"] for f in frames], dtype=torch.float32),
            radius=float(data["radius"]), fov_deg=float(data["fov_deg"]),
            normal_frame=data.get("normal_frame", "input_view"),
            input_view=int(data.get("input_view", 0)), extra=data.get("extra", {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write cameras.json atomically (temp name, then rename)."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Cameras":
        """Read and check cameras.json; CamerasFileError names the file, the view and the problem."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CamerasFileError(f"{path}: not a valid cameras.json ({err})") from err


class CamerasFileError(Nova3DError, ValueError):
    """cameras.json content no reader can use. A ValueError too, which the object-folder
    readers turn into their per-object failure (SampleError)."""


_REQUIRED_KEYS = ("frames", "width", "height", "radius", "fov_deg")
_FRAME_MATRICES = {"c2w": (4, 4), "K": (3, 3)}


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def check_cameras_json(data) -> None:
    """Raise CamerasFileError for parsed cameras.json content that is not a usable set of cameras.

    The one check of every reader (object folders, shards, fusion views), so that a bad pose
    fails at load time, naming the view, instead of part-way through a fit or an export: each
    c2w must be a finite rigid-transform-shaped 4x4 (last row [0, 0, 0, 1]), each K a finite 3x3.
    """
    if not isinstance(data, dict):
        raise CamerasFileError(f"expected a JSON object, got {_json_kind(data)}")
    if data.get("convention") != "opengl":
        raise CamerasFileError(f"cameras convention {data.get('convention')!r} is not 'opengl'")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise CamerasFileError(f"missing {', '.join(missing)}")
    frames = data["frames"]
    if not isinstance(frames, list) or not frames:
        raise CamerasFileError(f"'frames' must be a non-empty list of views, got {_json_kind(frames)}")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise CamerasFileError(f"view {i}: expected a JSON object, got {_json_kind(frame)}")
        for key, shape in _FRAME_MATRICES.items():
            try:
                m = np.asarray(frame[key], dtype=np.float64)  # numpy: ~5x faster than torch on 4x4
            except KeyError:
                raise CamerasFileError(f"view {i}: no {key}") from None
            except (TypeError, ValueError):  # ragged lists, strings, null
                raise CamerasFileError(f"view {i}: {key} is not a matrix of numbers") from None
            if m.shape != shape:
                got = "x".join(map(str, m.shape)) or "a scalar"
                raise CamerasFileError(f"view {i}: {key} is {got}, expected {shape[0]}x{shape[1]}")
            if not np.isfinite(m).all():
                raise CamerasFileError(f"view {i}: {key} has NaN/inf entries")
            if key == "c2w" and np.abs(m[3] - (0, 0, 0, 1)).max() > 1e-6:
                raise CamerasFileError(f"view {i}: c2w last row is {m[3].tolist()}, expected [0, 0, 0, 1]")
        for key in ("azimuth_deg", "elevation_deg"):
            if not isinstance(frame.get(key), (int, float)):
                raise CamerasFileError(f"view {i}: {key} must be a number")


def orbit_order(num_views: int, start: int) -> list[int]:
    """View indices of an orbit started at `start`: [start, start+1, ...] modulo V."""
    return [(start + k) % num_views for k in range(num_views)]


def orbit_azimuths(num_views: int, start_azimuth_deg: float = 0.0) -> Tensor:
    """[V] azimuths in degrees, evenly spaced, counter-clockwise from the start."""
    return start_azimuth_deg + 360.0 / num_views * torch.arange(num_views, dtype=torch.float32)


def orbit_positions(azimuth_deg: Tensor, elevation_deg: Tensor, radius: float) -> Tensor:
    """[V, 3] camera centres; azimuth 0 is on -Y, 90 on +X (module docstring)."""
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return radius * torch.stack(
        [torch.cos(el) * torch.sin(az), -torch.cos(el) * torch.cos(az), torch.sin(el)], dim=-1)


def look_at_c2w(eye: Tensor, target: Tensor | None = None,
                up: Sequence[float] = (0.0, 0.0, 1.0)) -> Tensor:
    """[..., 4, 4] opengl camera-to-world matrices for cameras at `eye` [..., 3] looking at `target`."""
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up_t = torch.tensor(up, dtype=eye.dtype).expand_as(eye)
    right = torch.linalg.cross(forward, up_t, dim=-1)
    # Looking straight up or down: any horizontal right vector will do; use +X.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([1.0, 0.0, 0.0]).expand_as(right), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    cam_up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2] = right, cam_up, -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def intrinsics(fov_deg: float, width: int, height: int) -> Tensor:
    """[3, 3] pinhole matrix; `fov_deg` spans the larger image side (Blender's sensor_fit AUTO)."""
    focal = 0.5 * max(width, height) / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def orbit_cameras(spec: OrbitSpec = OrbitSpec()) -> Cameras:
    """The cameras of an orbit; view 0 is the input view."""
    az = orbit_azimuths(spec.num_views, spec.start_azimuth_deg)
    el = torch.as_tensor(spec.elevation_deg, dtype=torch.float32).expand(spec.num_views).clone()
    c2w = look_at_c2w(orbit_positions(az, el, spec.radius))
    K = intrinsics(spec.fov_deg, spec.resolution, spec.resolution).expand(spec.num_views, 3, 3).clone()
    return Cameras(c2w, K, spec.resolution, spec.resolution, az, el, spec.radius, spec.fov_deg)


def scale_intrinsics(K: Tensor, scale: float) -> Tensor:
    """K for the same camera with the image resized by `scale` (pixel-edge convention)."""
    K = K.clone()
    K[..., :2, :] *= scale
    return K


def convert_c2w(c2w: Tensor, src: str, dst: str) -> Tensor:
    """Re-express camera-to-world matrices [..., 4, 4] in other camera axes."""
    for name in (src, dst):
        if name not in CAMERA_CONVENTIONS:
            raise ValueError(f"unknown camera convention {name!r}; expected one of {CAMERA_CONVENTIONS}")
    if (src == "opencv") == (dst == "opencv"):
        return c2w.clone()
    return c2w @ _GL_TO_CV.to(c2w)


def world_to_camera(c2w: Tensor) -> Tensor:
    """Inverse of rigid camera-to-world matrices [..., 4, 4]."""
    R, t = c2w[..., :3, :3], c2w[..., :3, 3:]
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = R.transpose(-1, -2)
    w2c[..., :3, 3:] = -R.transpose(-1, -2) @ t
    w2c[..., 3, 3] = 1.0
    return w2c


def project_points(points: Tensor, c2w: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points [N, 3] into views c2w [V, 4, 4], K [V, 3, 3].

    Returns pixel coordinates [V, N, 2] (x right, y down, pixel-edge origin) and the
    depth along each camera's viewing axis [V, N] (positive in front of the camera).
    """
    w2c = world_to_camera(convert_c2w(c2w, "opengl", "opencv"))
    cam = points @ w2c[:, :3, :3].transpose(-1, -2) + w2c[:, None, :3, 3]
    depth = cam[..., 2]
    pix = cam @ K.transpose(-1, -2)
    return pix[..., :2] / depth[..., None].clamp_min(1e-8), depth


def pixel_rays(c2w: Tensor, K: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rays through pixel centres: origins and unit directions, each [V, H, W, 3]."""
    j, i = torch.meshgrid(torch.arange(height, dtype=c2w.dtype) + 0.5,
                          torch.arange(width, dtype=c2w.dtype) + 0.5, indexing="ij")
    fx, fy = K[:, 0, 0, None, None], K[:, 1, 1, None, None]
    cx, cy = K[:, 0, 2, None, None], K[:, 1, 2, None, None]
    # opengl camera axes: y up and the camera looks down -z.
    dirs_cam = torch.stack([(i - cx) / fx, -(j - cy) / fy, -torch.ones_like(i - cx)], dim=-1)
    dirs = torch.einsum("vij,vhwj->vhwi", c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    return c2w[:, None, None, :3, 3].expand_as(dirs), dirs


def convert_normal_frame(normals: Tensor, c2w: Tensor, src: str, dst: str,
                         input_view: int = 0) -> Tensor:
    """Re-express normal maps [V, ..., 3] of views c2w [V, 4, 4] from frame `src` to `dst`."""
    for name in (src, dst):
        if name not in NORMAL_FRAMES:
            raise ValueError(f"unknown normal frame {name!r}; expected one of {NORMAL_FRAMES}")
    if src == dst:
        return normals.clone()
    V = c2w.shape[0]
    rot = c2w[:, :3, :3].to(normals)
    to_world = {"world": torch.eye(3).to(normals).expand(V, 3, 3),
                "view": rot,
                "input_view": rot[input_view].expand(V, 3, 3)}
    # n_dst = R_dst^T R_src n_src, with R the frame-to-world rotation of each view.
    M = to_world[dst].transpose(-1, -2) @ to_world[src]
    flat = normals.reshape(V, -1, 3)
    return (flat @ M.transpose(-1, -2)).reshape(normals.shape)


def encode_normals(normals: Tensor) -> Tensor:
    """Unit normals in [-1, 1] -> stored values in [0, 1]."""
    return (normals.clamp(-1, 1) + 1) / 2


def decode_normals(encoded: Tensor, eps: float = 1e-8) -> Tensor:
    """Stored values in [0, 1] -> unit normals (re-normalised to undo quantisation)."""
    return torch.nn.functional.normalize(encoded * 2 - 1, dim=-1, eps=eps)
