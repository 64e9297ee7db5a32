"""Built-in test objects made with trimesh/numpy: no downloads, deterministic.

Every object is in Blender's world frame (nova3d.cameras): +Z up, the front faces -Y,
so each has a clear front and up. They are chosen to stress a renderer and a camera
convention: asymmetric, concave, thin parts, several colours (vertex colours, one per
part) and a UV image texture (``crate``). Parts meeting at sharp edges are split there,
so the exported normals shade flat where a surface is flat and smooth where it is curved.

    PROCEDURAL_OBJECTS["mug"]()            # a trimesh.Trimesh
    export_object("crate", "crate.glb")    # colours / texture kept
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import trimesh
from PIL import Image

from data_prep.coloured_parts import coloured_part as _part
from data_prep.coloured_parts import combine_parts as _combine
from nova3d.mesh_io import save_mesh


def _move(mesh: trimesh.Trimesh, offset: Sequence[float] = (0, 0, 0), rot_deg: float = 0.0,
          axis: Sequence[float] = (0, 0, 1)) -> trimesh.Trimesh:
    """A copy rotated about `axis` through the origin, then translated."""
    mesh = mesh.copy()
    mesh.apply_transform(trimesh.transformations.rotation_matrix(math.radians(rot_deg), axis))
    mesh.apply_translation(offset)
    return mesh


def _box(extents: Sequence[float], centre: Sequence[float], rot_deg: float = 0.0) -> trimesh.Trimesh:
    return _move(trimesh.creation.box(extents=extents), centre, rot_deg)


def _rod(p0: Sequence[float], p1: Sequence[float], radius: float, sections: int = 24) -> trimesh.Trimesh:
    return trimesh.creation.cylinder(radius=radius, segment=[p0, p1], sections=sections)


def _tube(path: np.ndarray, radius: float, sections: int = 16) -> trimesh.Trimesh:
    """A closed tube around the closed polyline `path` [N, 3] (parallel-transported frames)."""
    n = len(path)
    tangents = np.roll(path, -1, axis=0) - np.roll(path, 1, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    normal = np.cross(tangents[0], [0.0, 0.0, 1.0])
    normal /= np.linalg.norm(normal)
    normals = []
    for t in tangents:  # parallel transport: remove the tangential part, renormalise
        normal = normal - np.dot(normal, t) * t
        normal /= np.linalg.norm(normal)
        normals.append(normal)
    normals = np.array(normals)
    # Transport does not close the loop: spread the leftover twist evenly so the seam matches.
    end = normals[-1] - np.dot(normals[-1], tangents[0]) * tangents[0]
    twist = math.atan2(np.dot(np.cross(end, normals[0]), tangents[0]), np.dot(end, normals[0]))
    angle = twist * np.arange(n)[:, None] / n
    binormals = np.cross(tangents, normals)
    normals, binormals = np.cos(angle) * normals + np.sin(angle) * binormals, \
        np.cos(angle) * binormals - np.sin(angle) * normals
    angle = np.linspace(0, 2 * np.pi, sections, endpoint=False)
    ring = np.cos(angle)[None, :, None] * normals[:, None] + np.sin(angle)[None, :, None] * binormals[:, None]
    vertices = (path[:, None] + radius * ring).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n), np.arange(sections), indexing="ij")
    a, b = i * sections + j, ((i + 1) % n) * sections + j
    c, d = ((i + 1) % n) * sections + (j + 1) % sections, i * sections + (j + 1) % sections
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    tube = trimesh.Trimesh(vertices, faces, process=False)  # keep the ring-by-ring vertex order
    if tube.volume < 0:  # wound inside out: normals must point outwards
        tube.invert()
    return tube


def _hull(points: Sequence[Sequence[float]]) -> trimesh.Trimesh:
    return trimesh.convex.convex_hull(np.asarray(points, dtype=float))


# --- objects -------------------------------------------------------------------------------

def mug() -> trimesh.Trimesh:
    """A hollow mug (concave) with coffee inside and a thin handle on its right (+X)."""
    wall = _move(trimesh.creation.annulus(r_min=0.34, r_max=0.4, height=0.9, sections=48), (0, 0, 0.45))
    bottom = _move(trimesh.creation.cylinder(radius=0.4, height=0.06, sections=48), (0, 0, 0.03))
    coffee = _move(trimesh.creation.cylinder(radius=0.345, height=0.04, sections=48), (0, 0, 0.62))
    handle = _move(trimesh.creation.torus(0.22, 0.045, 32, 12), (0.4, 0, 0.45), 90, (1, 0, 0))
    return _combine([_part(wall, (0.1, 0.45, 0.7)), _part(bottom, (0.1, 0.45, 0.7)),
                     _part(coffee, (0.3, 0.15, 0.05)), _part(handle, (0.95, 0.85, 0.2))])


def bracket() -> trimesh.Trimesh:
    """An L-shaped bracket: base plate, back plate, one gusset on the left, a boss on the right."""
    base = _box((1.0, 0.6, 0.08), (0, 0, 0.04))
    back = _box((1.0, 0.08, 0.62), (0, 0.26, 0.39))
    gusset = _hull([[x, y, z] for x in (-0.36, -0.3) for y, z in ((0.22, 0.08), (-0.25, 0.08), (0.22, 0.6))])
    boss = _rod((0.25, -0.1, 0.08), (0.25, -0.1, 0.2), 0.09, 32)
    return _combine([_part(base, (0.6, 0.62, 0.66)), _part(back, (0.45, 0.47, 0.52)),
                     _part(gusset, (0.95, 0.5, 0.1)), _part(boss, (0.8, 0.1, 0.1))])


def chair() -> trimesh.Trimesh:
    """A chair with four thin legs and a slatted backrest at the back (+Y)."""
    wood, dark, red = (0.7, 0.48, 0.25), (0.3, 0.18, 0.1), (0.75, 0.12, 0.12)
    parts = [_part(_box((0.5, 0.5, 0.05), (0, 0, 0.45)), wood)]
    for x in (-0.22, 0.22):
        for y in (-0.22, 0.22):
            top = 1.0 if y > 0 else 0.425
            parts.append(_part(_box((0.035, 0.035, top), (x, y, top / 2)), dark))
    for z in (0.62, 0.77, 0.92):
        parts.append(_part(_box((0.41, 0.025, 0.07), (0, 0.22, z)), red))
    return _combine(parts)


def torus_knot() -> trimesh.Trimesh:
    """A (2, 3) torus knot tube, coloured by a rainbow along its length."""
    t = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    r = 2 + np.cos(3 * t)
    path = 0.16 * np.stack([r * np.cos(2 * t), r * np.sin(2 * t), -np.sin(3 * t)], -1)
    tube = _tube(path, 0.09, 16)
    hue = np.repeat(t / (2 * np.pi), 16)  # vertices are ordered ring by ring
    rgb = 0.5 + 0.5 * np.cos(2 * np.pi * (hue[:, None] + np.array([0.0, 1 / 3, 2 / 3])))
    colours = np.hstack([np.round(rgb * 255), np.full((len(rgb), 1), 255)]).astype(np.uint8)
    return trimesh.Trimesh(tube.vertices, tube.faces, vertex_colors=colours, process=False)


def _cap_spots(centre: np.ndarray, radii: np.ndarray, tilt_deg: float) -> list[trimesh.Trimesh]:
    """White spots on the front/top of an ellipsoid cap, placed on its surface."""
    spots = []
    for az, el in ((-60, 30), (-100, 45), (-20, 50), (-140, 20), (0, 85), (-75, 65)):
        d = np.array([math.cos(math.radians(el)) * math.cos(math.radians(az)),
                      math.cos(math.radians(el)) * math.sin(math.radians(az)), math.sin(math.radians(el))])
        spot = _move(trimesh.creation.icosphere(2, 0.05), d * radii)
        spots.append(_move(spot, centre, tilt_deg, (1, 0, 0)))
    return spots


def mushroom() -> trimesh.Trimesh:
    """A spotted mushroom with a tilted cap and a small second one at its right."""
    parts = []
    for offset, size, tilt in (((0, 0, 0), 1.0, -12.0), ((0.42, -0.1, 0), 0.45, 15.0)):
        offset, radii = np.asarray(offset, float), np.array([0.42, 0.42, 0.22]) * size
        stem = trimesh.creation.cone(radius=0.14 * size, height=0.75 * size, sections=32)
        cap = trimesh.creation.icosphere(3, 1.0)
        cap.apply_scale(radii)
        centre = np.array([0, 0, 0.62 * size])
        parts += [_part(_move(stem, offset), (0.93, 0.88, 0.75)),
                  _part(_move(_move(cap, centre, tilt, (1, 0, 0)), offset), (0.85, 0.1, 0.08))]
        parts += [_part(_move(s, offset), (0.97, 0.97, 0.95)) for s in _cap_spots(centre, radii, tilt)]
    return _combine(parts)


def block_tower() -> trimesh.Trimesh:
    """A stacked toy: blocks of different colours, each shifted and turned."""
    return _combine([
        _part(_box((0.6, 0.5, 0.18), (0, 0, 0.09)), (0.1, 0.6, 0.2)),
        _part(_box((0.36, 0.36, 0.26), (-0.08, 0.02, 0.31), 20), (0.85, 0.1, 0.1)),
        _part(_move(trimesh.creation.cylinder(0.15, 0.22, 40), (0.04, -0.03, 0.55)), (0.1, 0.3, 0.85)),
        _part(_box((0.3, 0.16, 0.12), (0.1, -0.02, 0.72), -25), (0.95, 0.8, 0.1)),
        _part(_hull([[x, y, z] for x, y, z in ((-0.16, -0.1, 0.78), (0.2, -0.1, 0.78), (0.02, -0.1, 1.0),
                                              (-0.16, 0.1, 0.78), (0.2, 0.1, 0.78), (0.02, 0.1, 1.0))]),
              (0.6, 0.2, 0.8)),
    ])


def arrow() -> trimesh.Trimesh:
    """A thick arrow in the XZ plane pointing right (+X) and up, on a small stand."""
    shaft = _box((0.7, 0.12, 0.14), (-0.15, 0, 0))
    head = _hull([[x, y, z] for y in (-0.08, 0.08) for x, z in ((0.2, 0.3), (0.2, -0.3), (0.62, 0.0))])
    arrow_mesh = _combine([_part(shaft, (0.95, 0.8, 0.1)), _part(head, (0.85, 0.15, 0.1))])
    arrow_mesh = _move(arrow_mesh, (0, 0, 0.55), 30, (0, 1, 0))  # tilted: points up-right seen from the front
    post = _part(_rod((0, 0, 0.06), (0, 0, 0.5), 0.03), (0.2, 0.2, 0.25))
    stand = _part(_move(trimesh.creation.cylinder(0.2, 0.06, 40), (0, 0, 0.03)), (0.2, 0.2, 0.25))
    return _combine([arrow_mesh, post, stand])


def desk_lamp() -> trimesh.Trimesh:
    """A desk lamp: round base, a thin two-segment arm leaning left, a cone shade facing front-down."""
    base = _move(trimesh.creation.cylinder(0.2, 0.05, 40), (0.1, 0.05, 0.025))
    joints = np.array([[0.1, 0.05, 0.05], [-0.15, 0.1, 0.55], [-0.05, -0.15, 0.85]])
    arm = [_rod(joints[0], joints[1], 0.022), _rod(joints[1], joints[2], 0.022)]
    knuckles = [_move(trimesh.creation.icosphere(2, 0.04), p) for p in joints[1:]]
    shade = trimesh.creation.cone(radius=0.16, height=0.22, sections=40)
    shade = _move(shade, (0, 0, -0.22), 0)  # apex at the origin, opening downwards after the flip
    shade = _move(shade, joints[2] + [0, -0.02, 0.02], 150, (1, 0, 0))
    return _combine([_part(base, (0.15, 0.15, 0.18)), *[_part(a, (0.75, 0.75, 0.78)) for a in arm],
                     *[_part(k, (0.15, 0.15, 0.18)) for k in knuckles], _part(shade, (0.1, 0.55, 0.35))])


def _crate_texture(size: int = 256) -> Image.Image:
    """A 3 x 2 atlas of checkered wood panels; the front panel carries a big asymmetric 'F'."""
    cell = size // 3
    ys, xs = np.mgrid[0:2 * cell, 0:3 * cell]
    checker = ((xs // (cell // 8)) + (ys // (cell // 8))) % 2
    tints = np.array([[0.75, 0.55, 0.3], [0.65, 0.45, 0.25], [0.8, 0.6, 0.35],
                      [0.6, 0.42, 0.22], [0.7, 0.5, 0.3], [0.55, 0.38, 0.2]])
    tint = tints[(ys // cell) * 3 + xs // cell]
    image = tint * (0.75 + 0.25 * checker[..., None])
    image[(ys % cell < 3) | (xs % cell < 3) | (ys % cell > cell - 4) | (xs % cell > cell - 4)] = 0.25  # frame
    u, v = (xs % cell) / cell, (ys % cell) / cell  # the 'F' on cell 0 (the front)
    front = (ys < cell) & (xs < cell)
    stroke = ((u > 0.25) & (u < 0.38) & (v > 0.15) & (v < 0.85)) | ((v > 0.15) & (v < 0.28) & (u > 0.25) & (u < 0.75)) \
        | ((v > 0.45) & (v < 0.57) & (u > 0.25) & (u < 0.6))
    image[front & stroke] = [0.1, 0.25, 0.8]
    return Image.fromarray(np.round(image * 255).astype(np.uint8), "RGB")


def crate() -> trimesh.Trimesh:
    """A UV-textured box (image texture atlas); its front (-Y) face shows an 'F'."""
    half = np.array([0.5, 0.4, 0.35])
    # (outward normal, in-plane u axis, in-plane v axis) per face; u x v = normal.
    axes = [((0, -1, 0), (1, 0, 0), (0, 0, 1)), ((0, 1, 0), (-1, 0, 0), (0, 0, 1)),
            ((1, 0, 0), (0, 1, 0), (0, 0, 1)), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
            ((0, 0, 1), (1, 0, 0), (0, 1, 0)), ((0, 0, -1), (1, 0, 0), (0, -1, 0))]
    vertices, uvs, faces = [], [], []
    for k, (n, a, b) in enumerate(axes):
        n, a, b = (np.array(x, float) for x in (n, a, b))
        col, row = k % 3, k // 3
        for su, sv in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            vertices.append((n + su * a + sv * b) * half)
            # Atlas cell (col, row) counted from the top of the image; uv v grows upwards.
            uvs.append([(col + 0.5 + 0.48 * su) / 3, 1 - (row + 0.5 - 0.48 * sv) / 2])
        base = 4 * k
        faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
    # A white diffuse factor: trimesh's default (0.4 grey) is written as glTF baseColorFactor,
    # which Blender multiplies into the texture (a crate 40% as bright as its image).
    material = trimesh.visual.material.SimpleMaterial(image=_crate_texture(), diffuse=[255, 255, 255, 255])
    visual = trimesh.visual.TextureVisuals(uv=np.array(uvs), material=material)
    return trimesh.Trimesh(np.array(vertices), np.array(faces), visual=visual, process=False)


PROCEDURAL_OBJECTS: dict[str, Callable[[], trimesh.Trimesh]] = {
    "mug": mug,
    "bracket": bracket,
    "chair": chair,
    "torus_knot": torus_knot,
    "mushroom": mushroom,
    "block_tower": block_tower,
    "arrow": arrow,
    "desk_lamp": desk_lamp,
    "crate": crate,
}


def is_procedural(name: str) -> bool:
    """A built-in object's name, or a toy-family name (data_prep.toy_family.toy_name)."""
    from data_prep.toy_family import parse_toy_name

    return name in PROCEDURAL_OBJECTS or parse_toy_name(name) is not None


def make_object(name: str) -> trimesh.Trimesh:
    """A fresh copy of procedural object `name` (Blender world frame: Z up, front -Y): a built-in
    object, or a member of the toy family ("toy-s<seed>-<index>", data_prep.toy_family)."""
    from data_prep.toy_family import parse_toy_name, toy_object

    toy = parse_toy_name(name)
    if toy is not None:
        return toy_object(*toy)
    if name not in PROCEDURAL_OBJECTS:
        raise KeyError(f"unknown procedural object {name!r}; choose from {sorted(PROCEDURAL_OBJECTS)}")
    return PROCEDURAL_OBJECTS[name]()


def object_parts(name: str) -> list[trimesh.Trimesh]:
    """The parts object `name` was built from, geometry only (one mesh for an object of one part)."""
    mesh = make_object(name)
    counts = mesh.metadata.get("part_faces", [len(mesh.faces)])
    # process=True welds the copies that flat shading made of vertices on sharp edges
    return [trimesh.Trimesh(mesh.vertices, mesh.faces[end - n:end], process=True)
            for n, end in zip(counts, np.cumsum(counts))]


def solid_object(name: str) -> trimesh.Trimesh:
    """Object `name` as one closed surface without colours: the boolean union (manifold3d) of its
    closed parts. make_object's parts touch or overlap (a block resting on another), so their
    concatenation has faces inside the solid that no view can see; scoring a reconstruction
    against them would charge it for surface that does not exist (block_tower: 21 % of the area).
    Objects with an open part (the mug's wall) are returned as they are, geometry only."""
    parts = object_parts(name)
    if len(parts) == 1 or not all(part.is_volume for part in parts):
        return trimesh.util.concatenate(parts)
    return trimesh.boolean.union(parts, engine="manifold")


def export_object(name: str, path: str | Path, solid: bool = False) -> Path:
    """Write object `name` to .glb (colours, texture, normals kept) or .ply (colours, normals);
    solid: its solid_object instead (geometry only, the ground truth to score meshes against).

    Importing the file into Blender gives back the object in Blender's world frame:
    glTF is Y-up, so save_mesh turns the vertices and Blender's importer undoes it.
    """
    path = Path(path)
    mesh = solid_object(name) if solid else make_object(name)
    suffix = path.suffix.lower()
    if suffix == ".glb":  # Y-up, linear COLOR_0: nova3d.mesh_io's glTF convention
        save_mesh(mesh, path, include_normals=True)
    elif suffix == ".ply":
        if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
            mesh.visual = mesh.visual.to_color()
        path.write_bytes(trimesh.exchange.ply.export_ply(mesh, encoding="binary", vertex_normal=True))
    else:
        raise ValueError(f"cannot export {path}: use .glb or .ply")
    return path
