"""The Blender-free half of the renderer: settings, CLI, inputs, cameras and output files.

`render_views.py` drives Blender and hands the raw passes (world-space normals, depth)
to `write_view_files`, which turns them into an object folder per nova3d.data.schema.
Keeping this half free of bpy lets it be read and tested without Blender.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from nova3d.cameras import Cameras, OrbitSpec, convert_normal_frame, encode_normals, orbit_cameras
from nova3d.data import schema
from nova3d.data.png import encode_png16  # PIL cannot write 16-bit RGB
from nova3d.errors import Nova3DError

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".fbx")
BACKGROUNDS = {"transparent": None, "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}
DEVICES = ("auto", "cpu", "gpu")
FAILURES_FILE = "failures.jsonl"
LOG_FILE = "_blender.log"  # inside a partial folder: Blender's own chatter, not the terminal's
LOGS_DIR = "logs"  # <out>/logs/<object id>.log: the Blender output of objects that failed
ATTEMPTS_FILE = "_attempts"  # inside a partial folder: how many runs started this object
MAX_ATTEMPTS = 3  # an object whose render killed the process this often is a failure, not retried
_BIG_DEPTH = 1e6  # Cycles writes ~1e10 where a ray hits nothing


@dataclass(frozen=True)
class RenderSettings:
    """How every object is rendered (CLI flags of the same names; DESIGN.md §4 defaults)."""

    views: int = 16
    resolution: int = 256
    elevation: tuple[float, ...] = (0.0,)  # one value for all views, or one per view
    samples: int = 8  # with the denoiser: cleaner and faster than 16 noisy samples (see --help)
    denoise: bool = True  # OpenImageDenoise on the colour (guided by albedo + normal); passes stay raw
    fov: float = 49.1
    radius: float = 1.5
    random_azimuth: bool = False  # start azimuth drawn per object from (seed, object id)
    start_azimuth: float = 0.0  # degrees, view 0's azimuth when not random (held-out cameras sit between views)
    seed: int = 0
    background: str = "transparent"  # or a colour in BACKGROUNDS: RGB composited on it
    depth: bool = False
    device: str = "auto"  # "auto": a GPU if Cycles finds one, else the CPU
    limit: int | None = None  # render at most this many of the inputs (in input order)

    def check(self) -> None:
        """Raise Nova3DError for values no render could honour."""
        from nova3d import number_checks as num

        num.count("--views", self.views)
        num.count("--resolution", self.resolution, 8)
        num.count("--samples", self.samples)
        if self.limit is not None:
            num.count("--limit", self.limit, 0)
        if len(self.elevation) not in (1, self.views):
            raise Nova3DError(f"--elevation takes 1 value or one per view ({self.views}), got {len(self.elevation)}")
        if not 0 < self.fov < 180 or self.radius <= 0:
            raise Nova3DError("--fov must be in (0, 180) degrees and --radius positive")
        if self.background not in BACKGROUNDS:
            raise Nova3DError(f"--background must be one of {sorted(BACKGROUNDS)}, got {self.background!r}")
        if self.device not in DEVICES:
            raise Nova3DError(f"--device must be one of {DEVICES}, got {self.device!r}")


@dataclass(frozen=True)
class ObjectSource:
    """One object to render: a mesh file, or a procedural object by name."""

    object_id: str
    source: str  # recorded in meta.json: the file path, or "procedural:<name>"
    path: Path | None = None
    procedural: str | None = None


@dataclass
class RenderSummary:
    """What a `render_objects` run did; `exit_code` is the CLI's exit status."""

    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # the failures.jsonl records of this run
    seconds: dict[str, float] = field(default_factory=dict)  # object id -> render wall time

    @property
    def exit_code(self) -> int:
        """0: all rendered (or skipped); 1: some objects failed (the others rendered). 2 is the
        CLI's for unusable input or arguments, when nothing was rendered."""
        return 1 if self.failed else 0

    redone: dict[str, str] = field(default_factory=dict)  # object id -> why its earlier render was stale

    def describe(self) -> str:
        timing = ""
        if self.seconds:
            timing = f", {sum(self.seconds.values()) / len(self.seconds):.2f} s/object"
        redone = f" ({len(self.redone)} re-rendered: settings changed)" if self.redone else ""
        return (f"rendered {len(self.rendered)}{redone}, skipped {len(self.skipped)} (already done), "
                f"failed {len(self.failed)}{timing}")


def stale_reason(folder: Path, settings: RenderSettings) -> str | None:
    """Why a finished render in `folder` does not match `settings` (its meta.json), or None when
    it does: a resumed run with another --resolution must not keep the old renders."""
    try:
        meta = json.loads((folder / schema.META_FILE).read_text())
        rendered = meta.get("settings", {})
        pairs = [("--views", meta.get("num_views"), settings.views),
                 ("--resolution", meta.get("resolution"), settings.resolution),
                 ("--samples", meta.get("renderer", {}).get("samples"), settings.samples),
                 ("--fov", rendered.get("fov_deg"), settings.fov),
                 ("--radius", rendered.get("radius"), settings.radius),
                 ("--seed", rendered.get("seed"), settings.seed),
                 ("--random-azimuth", rendered.get("random_azimuth"), settings.random_azimuth),
                 ("--start-azimuth", None if rendered.get("random_azimuth") else rendered.get("start_azimuth_deg"),
                  None if settings.random_azimuth else settings.start_azimuth),
                 ("--background", rendered.get("background"), settings.background)]
        elevation = rendered.get("elevation_deg")
    except (OSError, ValueError, AttributeError) as err:
        return f"unreadable {schema.META_FILE} ({err})"
    changed = [f"{flag} {old} -> {new}" for flag, old, new in pairs if old is not None and old != new]
    if elevation is not None and [float(e) for e in elevation] != [float(e) for e in settings.elevation]:
        changed.append(f"--elevation {elevation} -> {list(settings.elevation)}")
    if settings.depth and not meta.get("has_depth", False):
        changed.append("--depth asked for, the render has none")
    return ", ".join(changed) or None


def collect_sources(inputs: list[str], procedural: list[str] | None = None) -> list[ObjectSource]:
    """Mesh files (folders searched recursively) and procedural names -> sources with unique ids.

    A missing path or an unknown procedural name raises Nova3DError. An explicitly named file
    with an unsupported suffix is kept, so it is reported as a failure rather than ignored.
    """
    from data_prep.procedural import PROCEDURAL_OBJECTS, is_procedural  # trimesh objects; only needed here

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise Nova3DError(f"input not found: {item}")
    sources, taken = [], set()
    for path in files:
        object_id = _unique_id(schema.safe_object_id(path.stem), str(path.resolve()), taken)
        sources.append(ObjectSource(object_id, str(path.resolve()), path=path))
    for name in procedural or []:
        if not is_procedural(name):
            raise Nova3DError(f"unknown procedural object {name!r}; choose from {', '.join(PROCEDURAL_OBJECTS)} "
                              "or a toy-family name toy-s<seed>-<index>")
        object_id = _unique_id(schema.safe_object_id(name), f"procedural:{name}", taken)
        sources.append(ObjectSource(object_id, f"procedural:{name}", procedural=name))
    return sources


def _unique_id(object_id: str, key: str, taken: set[str]) -> str:
    """`object_id`, or with a hash of `key` appended when two inputs share a name."""
    if object_id in taken:
        object_id = f"{object_id}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    taken.add(object_id)
    return object_id


def heldout_settings(settings: RenderSettings) -> RenderSettings:
    """8 cameras between an orbit's azimuths (half a step on), at +20° / -20° elevation alternately: where a
    texture fitted to the orbit's views is scored on views it never saw (issue 18)."""
    return dataclasses.replace(settings, views=8, elevation=(20.0, -20.0) * 4, start_azimuth=180.0 / settings.views,
                               random_azimuth=False)


def object_cameras(settings: RenderSettings, object_id: str) -> Cameras:
    """The orbit of one object; with random_azimuth its start depends on (seed, object id) only."""
    start = settings.start_azimuth
    if settings.random_azimuth:
        digest = hashlib.sha256(f"{settings.seed}:{object_id}".encode()).digest()
        start = random.Random(int.from_bytes(digest[:8], "big")).uniform(0.0, 360.0)
    elevation = settings.elevation[0] if len(settings.elevation) == 1 else tuple(settings.elevation)
    spec = OrbitSpec(num_views=settings.views, elevation_deg=elevation, start_azimuth_deg=start,
                     radius=settings.radius, fov_deg=settings.fov, resolution=settings.resolution)
    cameras = orbit_cameras(spec)
    cameras.extra = {"object_id": object_id, "start_azimuth_deg": start}
    return cameras


def object_meta(source: ObjectSource, settings: RenderSettings, cameras: Cameras, normalisation: dict,
                renderer: dict) -> schema.ObjectMeta:
    """meta.json of a rendered object: where it came from and every setting that shaped it."""
    return schema.ObjectMeta(
        object_id=source.object_id, source=source.source, num_views=len(cameras), resolution=settings.resolution,
        normalisation=normalisation,
        renderer={**renderer, "samples": settings.samples,
                  "denoiser": "OPENIMAGEDENOISE" if settings.denoise else None},
        settings={"fov_deg": settings.fov, "radius": settings.radius, "elevation_deg": list(settings.elevation),
                  "start_azimuth_deg": cameras.extra["start_azimuth_deg"], "random_azimuth": settings.random_azimuth,
                  "seed": settings.seed, "background": settings.background,
                  "lighting": "uniform white world, strength 1", "view_transform": "Standard",
                  "normal_frame": cameras.normal_frame, "mask": "alpha >= 128"},
        has_depth=settings.depth)


def previous_attempts(partial: Path) -> int:
    """How many earlier runs started this object and died before finishing it."""
    counter = partial / ATTEMPTS_FILE
    return int(counter.read_text() or 0) if counter.is_file() else 0


def start_attempt(partial: Path) -> None:
    """Empty `partial` (left over from an interrupted run) and count one more attempt in it."""
    attempt = previous_attempts(partial) + 1
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    (partial / ATTEMPTS_FILE).write_text(str(attempt))


@contextlib.contextmanager
def redirect_output(log_path: Path) -> Iterator[None]:
    """Send Blender's C-level stdout/stderr chatter to a log file (keeps the progress bar clean)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def append_failure(out_dir: Path, record: dict) -> None:
    """Add a record to failures.jsonl, once: re-running a failing object does not repeat it."""
    path = out_dir / FAILURES_FILE
    line = json.dumps(record)
    if path.is_file() and line in path.read_text().splitlines():
        return
    with open(path, "a") as handle:
        handle.write(line + "\n")


def _save_png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # ~3x faster than the default, ~10% larger
    path.write_bytes(buf.getvalue())


def write_view_files(folder: Path, cameras: Cameras, normals_world: np.ndarray,
                     depth: np.ndarray | None, background: str = "transparent") -> np.ndarray:
    """Finish an object folder whose rgb/ PNGs Blender wrote: masks, normals, depth, background.

    normals_world: [V, H, W, 3] Cycles Normal pass (world frame, ~0 where nothing was hit).
    depth: [V, H, W] Cycles Depth pass (distance along the camera axis) or None.
    Returns the masks [V, H, W] (bool).
    """
    alphas = []
    for i in range(len(cameras)):
        rgb_path = folder / schema.RGB_DIR / schema.view_name(i)
        rgba = np.asarray(Image.open(rgb_path).convert("RGBA"))
        alphas.append(rgba[..., 3])
        if BACKGROUNDS[background] is not None:  # composite straight colour over the background
            a = rgba[..., 3:].astype(np.float32) / 255
            rgb = rgba[..., :3] * a + np.array(BACKGROUNDS[background]) * 255 * (1 - a)
            rgba = np.dstack([np.round(rgb).astype(np.uint8), rgba[..., 3]])
            _save_png(Image.fromarray(rgba, "RGBA"), rgb_path)
    masks = np.stack(alphas) >= 128  # coverage of at least half a pixel

    # Edge pixels average the normal with the empty background: renormalise the direction.
    n = torch.from_numpy(np.ascontiguousarray(normals_world, dtype=np.float32))
    length = n.norm(dim=-1, keepdim=True)
    hit = length > 1e-3
    n = torch.where(hit, n / length.clamp_min(1e-8), torch.zeros_like(n))
    stored = convert_normal_frame(n, cameras.c2w, "world", cameras.normal_frame, cameras.input_view)
    stored = torch.where(hit, torch.nn.functional.normalize(stored, dim=-1), torch.zeros_like(stored))
    encoded = np.round(encode_normals(stored).numpy() * 65535).astype(np.uint16)

    (folder / schema.MASK_DIR).mkdir(exist_ok=True)
    (folder / schema.NORMAL_DIR).mkdir(exist_ok=True)
    if depth is not None:
        (folder / schema.DEPTH_DIR).mkdir(exist_ok=True)
    for i in range(len(cameras)):
        name = schema.view_name(i)
        _save_png(Image.fromarray(masks[i].astype(np.uint8) * 255, "L"), folder / schema.MASK_DIR / name)
        (folder / schema.NORMAL_DIR / name).write_bytes(encode_png16(encoded[i], level=1))
        if depth is not None:
            d = np.where(masks[i] & (depth[i] < _BIG_DEPTH), depth[i], 0.0) * schema.DEPTH_SCALE
            d16 = np.round(np.clip(d, 0, 65535)).astype(np.uint16)
            (folder / schema.DEPTH_DIR / name).write_bytes(encode_png16(d16[..., None], level=1))
    return masks


# --- command line -------------------------------------------------------------------------

def build_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    d = RenderSettings()
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("inputs", nargs="*", help=f"mesh files ({' '.join(MESH_SUFFIXES)}) or folders of them")
    p.add_argument("--procedural", nargs="*", metavar="NAME", help="built-in objects (none named: all of them)")
    p.add_argument("--out", required=True, help="output folder: one object folder per input")
    p.add_argument("--views", type=int, default=d.views)
    p.add_argument("--resolution", type=int, default=d.resolution)
    p.add_argument("--elevation", type=float, nargs="+", default=list(d.elevation),
                   help="degrees: one value for all views, or one per view")
    p.add_argument("--samples", type=int, default=d.samples, help="Cycles samples per pixel")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, default=d.denoise,
                   help="OpenImageDenoise the colour (masks, normals and depth are never denoised)")
    p.add_argument("--fov", type=float, default=d.fov, help="degrees, across the image")
    p.add_argument("--radius", type=float, default=d.radius, help="camera distance from the origin")
    p.add_argument("--random-azimuth", action="store_true", help="random start azimuth per object (seeded)")
    p.add_argument("--start-azimuth", type=float, default=d.start_azimuth, help="view 0's azimuth, degrees")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--background", default=d.background, choices=list(BACKGROUNDS))
    p.add_argument("--depth", action="store_true", help="also write depth/ (schema.DEPTH_SCALE)")
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--limit", type=int, default=None, help="render at most this many inputs")
    return p


def parse_run(args: argparse.Namespace) -> tuple[list[ObjectSource], RenderSettings]:
    """Sources and settings from parsed arguments; Nova3DError for input no run could use."""
    from data_prep.procedural import PROCEDURAL_OBJECTS

    if not args.inputs and args.procedural is None:
        raise Nova3DError("nothing to render: give mesh files/folders or --procedural")
    names = None if args.procedural is None else (args.procedural or list(PROCEDURAL_OBJECTS))
    sources = collect_sources(args.inputs, names)
    if not sources:
        raise Nova3DError(f"no mesh files ({' '.join(MESH_SUFFIXES)}) found in {' '.join(args.inputs)}")
    settings = RenderSettings(
        views=args.views, resolution=args.resolution, elevation=tuple(args.elevation), samples=args.samples,
        denoise=args.denoise, fov=args.fov, radius=args.radius, random_azimuth=args.random_azimuth,
        start_azimuth=args.start_azimuth, seed=args.seed, background=args.background, depth=args.depth,
        device=args.device, limit=args.limit)
    settings.check()
    return sources, settings
