"""Pictures of a fusion result: a turntable of the mesh (GIF, or MP4 when an encoder is
installed) and the conflict-map sheet (views over their conflict heatmaps, optionally over the
true corruption masks of a `nova3d perturb` folder). matplotlib is not a dependency: the
heatmap colours are viridis, interpolated from nine of its entries.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm.auto import tqdm

from nova3d.atomic import atomic_path
from nova3d.cameras import Cameras, OrbitSpec, orbit_cameras
from nova3d.errors import Nova3DError
from nova3d.viz import save_png_atomic, to_uint8

# matplotlib's viridis at 0, 1/8, ..., 1; the 256-entry table interpolates linearly between them.
_VIRIDIS_ANCHORS = np.array([
    [0.267004, 0.004874, 0.329415], [0.282623, 0.140926, 0.457517], [0.229739, 0.322361, 0.545706],
    [0.172719, 0.448791, 0.557885], [0.127568, 0.566949, 0.550556], [0.157851, 0.683765, 0.501686],
    [0.369214, 0.788888, 0.382914], [0.678489, 0.863742, 0.189503], [0.993248, 0.906157, 0.143936]])
_T = np.linspace(0, 1, 256)
VIRIDIS = np.stack([np.interp(_T, np.linspace(0, 1, len(_VIRIDIS_ANCHORS)), _VIRIDIS_ANCHORS[:, c])
                    for c in range(3)], -1).astype(np.float32)  # [256, 3]
_LABEL = 14  # pixel height of a text line


def colormap(values: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """values [...] in [0, 1] (clamped; NaN -> 0) -> viridis colours [..., 3] in [0, 1], of the
    same array type as the input (torch in, torch out on the same device)."""
    if isinstance(values, Tensor):
        idx = (values.detach().float().nan_to_num(0.0).clamp(0, 1) * 255 + 0.5).long()
        return torch.as_tensor(VIRIDIS, device=values.device)[idx]
    idx = (np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0, 1) * 255 + 0.5).astype(np.int64)
    return VIRIDIS[idx]


# --- turntable -------------------------------------------------------------------------------
def turntable_cameras(mesh, frames: int, image_size: int, elevation_deg: float) -> Cameras:
    """An orbit of `frames` cameras around the mesh's bounding-box centre, starting at the front;
    radius 1.5 x the longest side (the convention's 1.5 for a unit-box object)."""
    lo, hi = np.asarray(mesh.bounds, dtype=np.float32)
    cams = orbit_cameras(OrbitSpec(num_views=frames, elevation_deg=elevation_deg,
                                   radius=1.5 * max(float((hi - lo).max()), 1e-3), resolution=image_size))
    cams.c2w[:, :3, 3] += torch.as_tensor((lo + hi) / 2)  # the whole rig moves: directions unchanged
    cams.normal_frame = "world"  # no normal maps here; lets select() take any single frame
    return cams


def _base_colors(mesh, data) -> Tensor:
    """[N, 3] the mesh's colour per vertex (a texture sampled at the vertices; grey if none)."""
    if data.texture is not None:
        from nova3d.fusion.mesh import texture_to_vertex_colors

        return torch.as_tensor(texture_to_vertex_colors(mesh).visual.vertex_colors[:, :3], dtype=torch.float32) / 255
    if data.vertex_colors is not None:
        return data.vertex_colors.float()
    return torch.full((len(data.verts), 3), 0.8)


def render_turntable(mesh, frames: int = 24, image_size: int = 256, elevation_deg: float = 15.0,
                     shading: str = "headlight", ambient: float = 0.5, progress: bool = True) -> np.ndarray:
    """[frames, H, W, 3] uint8 renders of a trimesh on white, orbiting counter-clockwise from the
    front. shading "headlight": colour x (ambient + (1 - ambient) n.l) with the light at each
    camera, so shape reads on flat-coloured meshes (a texture is sampled per vertex for it);
    "unlit": the stored colours as they are."""
    from nova3d.eval.mesh_render import MeshData, as_mesh_data, render_mesh

    if shading not in ("headlight", "unlit"):
        raise Nova3DError(f"turntable: shading must be 'headlight' or 'unlit', got {shading!r}")
    if len(mesh.faces) == 0:
        raise Nova3DError("turntable: the mesh has no faces")
    cams = turntable_cameras(mesh, frames, image_size, elevation_deg)
    data = as_mesh_data(mesh)
    if shading == "headlight":
        base = _base_colors(mesh, data)
        normals = torch.as_tensor(np.array(mesh.vertex_normals), dtype=torch.float32)
    out = []
    for k in tqdm(range(frames), desc="turntable", leave=False, disable=not progress):
        view = cams.select([k])
        if shading == "headlight":
            light = view.c2w[0, :3, 2]  # the camera's back axis points from the object to it
            shade = ambient + (1 - ambient) * (normals @ light).clamp(0, 1)
            lit = MeshData(data.verts, data.faces, vertex_colors=(base * shade[:, None]).clamp(0, 1))
            frame = render_mesh(lit, view, image_size, background=1.0)
        else:
            frame = render_mesh(data, view, image_size, background=1.0)
        out.append(to_uint8(frame.rgb[0]))
    return np.stack(out)


def write_animation(frames: np.ndarray, out_path: str | os.PathLike, fps: float = 12) -> Path:
    """Frames [N, H, W, 3] uint8 -> an endlessly looping .gif (PIL) or an .mp4 (imageio with the
    pyav or imageio-ffmpeg plugin, when installed), written atomically."""
    path = Path(out_path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise Nova3DError(f"{path}: a turntable is written as .gif or .mp4, not {suffix or 'no suffix'}")
    if suffix == ".mp4" and not (importlib.util.find_spec("av") or importlib.util.find_spec("imageio_ffmpeg")):
        raise Nova3DError(f"{path}: writing .mp4 needs the 'av' or 'imageio-ffmpeg' package, which is not "
                          "installed; write a .gif instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=max(1, round(1000 / fps)), loop=0, optimize=False)
        else:
            import imageio.v3 as iio

            plugin = "pyav" if importlib.util.find_spec("av") else "FFMPEG"
            kwargs = {"codec": "libx264"} if plugin == "pyav" else {}
            iio.imwrite(tmp, frames, extension=".mp4", plugin=plugin, fps=fps, **kwargs)
    return path


def turntable(mesh, out_path: str | os.PathLike, frames: int = 24, image_size: int = 256,
              elevation_deg: float = 15.0, fps: float = 12, shading: str = "headlight",
              progress: bool = True) -> Path:
    """Render a trimesh turning once around (render_turntable) into a .gif or .mp4; returns the path."""
    if frames < 1:
        raise Nova3DError(f"turntable: frames must be >= 1, got {frames}")
    video = render_turntable(mesh, frames, image_size, elevation_deg, shading, progress=progress)
    return write_animation(video, out_path, fps)


# --- conflict sheet --------------------------------------------------------------------------
def _tiles(images: np.ndarray, tile: int, resample) -> list[Image.Image]:
    return [Image.fromarray(a).resize((tile, tile), resample) for a in images]


def colorbar(height: int, width: int = 12) -> np.ndarray:
    """[height, width, 3] uint8: the colormap from 1 (top) to 0 (bottom)."""
    ramp = np.linspace(1, 0, height, dtype=np.float32)[:, None].repeat(width, 1)
    return (colormap(ramp) * 255 + 0.5).astype(np.uint8)


def off_mask_conflict(conflict: Tensor, truth: Tensor | np.ndarray) -> Tensor:
    """conflict [V, h, w], truth [V, H, W] (bool, any size) -> [V, h, w] the conflict where the
    truth says clean (issue 15 §2: where learned maps fire that the corruption does not). A map
    pixel counts as corrupted when any truth pixel under it is (max-pooled), so a mask's edge is
    not mistaken for a false positive."""
    conflict = torch.as_tensor(conflict).detach().float().cpu()
    t = torch.as_tensor(np.asarray(torch.as_tensor(truth).cpu()) > 0).float()[:, None]
    t = torch.nn.functional.adaptive_max_pool2d(t, conflict.shape[-2:]) if t.shape[-1] >= conflict.shape[-1] else \
        torch.nn.functional.interpolate(t, size=conflict.shape[-2:], mode="nearest")
    return conflict * (1 - t[:, 0])


def conflict_sheet(rgb: Tensor, conflict: Tensor, out_path: str | os.PathLike,
                   titles: Sequence[str] | None = None, truth: Tensor | np.ndarray | None = None,
                   tile: int = 128, off_mask: bool = False) -> Path:
    """One PNG: row 1 the views rgb [V, 3, H, W] in [0, 1]; row 2 their conflict maps
    conflict [V, h, w] in [0, 1] as viridis heatmaps (nearest-neighbour resized, with a colour
    bar on the right); row 3, when `truth` [V, h', w'] (e.g. perturb/corruption masks) is given,
    the true corruption in white on black; row 4 with `off_mask`, the conflict outside the true
    corruption (off_mask_conflict: the learned map's false positives), stretched by the gain in its
    label. `titles` default to
    "view k  mean c". Written atomically.
    """
    V = rgb.shape[0]
    if off_mask and truth is None:
        raise Nova3DError(f"{out_path}: off_mask needs truth (the true corruption masks)")
    if conflict.shape[0] != V or (truth is not None and len(truth) != V):
        raise Nova3DError(f"{out_path}: {V} views but {conflict.shape[0]} conflict maps"
                          + ("" if truth is None else f" and {len(truth)} corruption masks"))
    conflict = torch.as_tensor(conflict).detach().float().cpu()
    if titles is None:
        titles = [f"view {k}  c={float(conflict[k].mean()):.2f}" for k in range(V)]
    rows = [("views", _tiles(to_uint8(rgb), tile, Image.BILINEAR)),
            ("conflict (mean per view above)", _tiles((colormap(conflict).numpy() * 255 + 0.5).astype(np.uint8),
                                                      tile, Image.NEAREST))]
    if truth is not None:
        t = (np.asarray(torch.as_tensor(truth).cpu()) > 0).astype(np.uint8) * 255
        rows.append(("true corruption", _tiles(np.repeat(t[..., None], 3, -1), tile, Image.NEAREST)))
    if off_mask:
        # Stretched to the map's own top (99.5th percentile of its non-zero values): learned maps
        # can be faint (c ~ 0.01 at short budgets), and their off-mask structure would not show.
        fp = off_mask_conflict(conflict, truth)
        fired = conflict[conflict > 0]
        gain = 1.0 / max(float(fired.quantile(0.995)) if fired.numel() else 1.0, 1e-3)
        rows.append((f"conflict outside the true corruption (x{gain:.3g})",
                     _tiles((colormap(fp * gain).numpy() * 255 + 0.5).astype(np.uint8), tile, Image.NEAREST)))
    bar_w = 44  # the colour bar and its 0 / 1 labels
    row_h = tile + _LABEL
    sheet = Image.new("RGB", (V * tile + bar_w, len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, tiles) in enumerate(rows):
        y = r * row_h
        if r:
            draw.text((4, y + 1), label, fill="black")
        for k, image in enumerate(tiles):
            sheet.paste(image, (k * tile, y + _LABEL))
            if r == 0:
                draw.text((k * tile + 4, 1), titles[k], fill="black")
    bar_y = row_h + _LABEL  # beside the conflict row
    sheet.paste(Image.fromarray(colorbar(tile)), (V * tile + 4, bar_y))
    draw.text((V * tile + 20, bar_y - 2), "1", fill="black")
    draw.text((V * tile + 20, bar_y + tile - 10), "0", fill="black")
    return save_png_atomic(sheet, out_path)


def sheet_tile_origin(row: int, view: int, tile: int = 128) -> tuple[int, int]:
    """(x, y) of the top-left pixel of `view`'s tile in `row` of a conflict_sheet."""
    return view * tile, row * (tile + _LABEL) + _LABEL
