"""Mesh files <-> trimesh meshes in nova3d's world frame, each format's conventions kept at the file.

In memory a mesh is always in the world frame of nova3d.cameras (Blender's: +Z up, the front
faces -Y) with sRGB uint8 vertex colours. At the file, per format:

  .glb / .gltf  glTF is +Y up with the front facing +Z (spec). Saved turned Z-up -> Y-up,
                turned back when loaded; Blender's glTF importer applies the same turn.
  .obj          no axes in the format, but Blender's OBJ importer/exporter (forward -Z, up Y),
                GSO and most tools treat it as Y-up: the same turn.
  .ply / .stl   stored as is (Blender's PLY/STL importers default to Z up: no turn).

The turn: world (x, y, z) -> file (x, z, -y), -90 degrees about X (Z_UP_TO_Y_UP; Y_UP_TO_Z_UP
undoes it). Both are exact 0/+-1 matrices, so a save/load round trip changes no coordinate.

Vertex colours: glTF's COLOR_0 is linear by spec (baseColorTexture images are sRGB and are
kept as they are). save_mesh writes COLOR_0 as float linear RGBA, so Blender shows the intended
colours and load_mesh's linear -> sRGB gives back the same 8-bit values exactly (8-bit linear
would merge dark shades). Plain trimesh exports write sRGB bytes into COLOR_0 unconverted: such
files come back brighter here, as they do in Blender. .obj ("v x y z r g b") and .ply colours
are sRGB as stored.

    save_mesh(mesh, "out/mesh.glb")         # atomic; .obj also writes <stem>.mtl + texture beside it
    mesh = load_mesh("pred/mesh.glb")       # a trimesh.Trimesh (scenes concatenated), world frame
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import trimesh

from nova3d.atomic import atomic_path
from nova3d.errors import Nova3DError

# World (Blender, Z up, front -Y) -> glTF / OBJ (Y up, front +Z): (x, y, z) -> (x, z, -y).
Z_UP_TO_Y_UP = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
Y_UP_TO_Z_UP = Z_UP_TO_Y_UP.T.copy()  # a rotation: the inverse is the transpose
Y_UP_SUFFIXES = (".glb", ".gltf", ".obj")
AS_STORED_SUFFIXES = (".ply", ".stl")
MESH_SUFFIXES = Y_UP_SUFFIXES + AS_STORED_SUFFIXES
_LINEAR_ATTR = "_nova3d_linear_rgba"  # trimesh writes custom float attributes; renamed to COLOR_0


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB transfer function inverse, elementwise on [0, 1] floats."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """sRGB transfer function, elementwise on [0, 1] floats."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def file_transform(path: str | os.PathLike) -> np.ndarray:
    """The 4x4 transform load_mesh applies to `path`'s stored coordinates (identity: as stored)."""
    suffix = _suffix(path)
    return Y_UP_TO_Z_UP.copy() if suffix in Y_UP_SUFFIXES else np.eye(4)


def _suffix(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise Nova3DError(f"{path}: unsupported mesh format {suffix or '(no suffix)'}; "
                          f"expected one of {', '.join(MESH_SUFFIXES)}")
    return suffix


def _is_textured(mesh: trimesh.Trimesh) -> bool:
    return (mesh.visual.kind == "texture" and getattr(mesh.visual, "uv", None) is not None
            and getattr(mesh.visual.material, "image", None) is not None)


def _write(path: Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _linear_colours(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy whose vertex colours sit as float linear RGBA under _LINEAR_ATTR (trimesh would write sRGB bytes)."""
    mesh = mesh.copy()
    if mesh.visual.kind in ("vertex", "face"):
        rgba = np.asarray(mesh.visual.vertex_colors, dtype=np.float64) / 255
        linear = np.concatenate([srgb_to_linear(rgba[:, :3]), rgba[:, 3:]], axis=1).astype(np.float32)
        mesh.visual = trimesh.visual.ColorVisuals(mesh)
        mesh.vertex_attributes[_LINEAR_ATTR] = linear
    return mesh


def _gltf_bytes(meshes: trimesh.Trimesh | list[trimesh.Trimesh], binary: bool, include_normals: bool | None) -> bytes:
    """glTF bytes of Y-up meshes (one node each), vertex colours as float linear COLOR_0 (module docstring)."""
    scene = trimesh.Scene([_linear_colours(m) for m in (meshes if isinstance(meshes, list) else [meshes])])

    def rename(tree: dict) -> None:
        for gmesh in tree.get("meshes", []):
            for prim in gmesh["primitives"]:
                attrs = prim["attributes"]
                if _LINEAR_ATTR in attrs:  # the float data under glTF's name: a JSON-only change
                    attrs["COLOR_0"] = attrs.pop(_LINEAR_ATTR)

    if binary:
        return trimesh.exchange.gltf.export_glb(scene, include_normals=include_normals, tree_postprocessor=rename)
    files = trimesh.exchange.gltf.export_gltf(scene, include_normals=include_normals, tree_postprocessor=rename,
                                              embed_buffers=True)
    return files["model.gltf"]


def save_parts(parts: list[trimesh.Trimesh], path: str | os.PathLike) -> Path:
    """Write meshes in the world frame as one .glb, each its own node with its own colours or texture
    (save_mesh would need them merged into one, which drops textures of all but one); atomic."""
    path = Path(path)
    if _suffix(path) != ".glb":
        raise ValueError(f"{path}: save_parts writes .glb only")
    _write(path, _gltf_bytes([m.copy().apply_transform(Z_UP_TO_Y_UP) for m in parts], True, None))
    return path


def save_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike, include_normals: bool | None = None) -> Path:
    """Write `mesh` (world frame) to `path` in its format's convention (module docstring); returns path.

    Every file is written atomically. .glb/.gltf carry vertex colours (linear COLOR_0) or the
    texture (PBR baseColorTexture); .obj carries vertex colours ("v x y z r g b") or <stem>.mtl
    + the texture image beside it (written before the .obj, the material named <stem>); .ply
    and .stl are written as trimesh writes them (.ply binary, with vertex colours).
    include_normals (.glb/.gltf/.ply): write vertex normals (None: trimesh's default, .glb only
    when they are cached; they are not after the copy made here).
    """
    path = Path(path)
    suffix = _suffix(path)
    out = mesh.copy()
    if suffix in Y_UP_SUFFIXES:
        out.apply_transform(Z_UP_TO_Y_UP)
    if suffix in (".glb", ".gltf"):
        _write(path, _gltf_bytes(out, suffix == ".glb", include_normals))
    elif suffix == ".obj":
        from trimesh.exchange.obj import export_obj

        textured = _is_textured(out)
        if textured:  # the image file is named after the material: keep stems in one folder apart
            out.visual.material.name = path.stem
        text, files = export_obj(out, include_normals=False, include_color=not textured,
                                 include_texture=textured, return_texture=True, mtl_name=f"{path.stem}.mtl")
        for name, data in files.items():  # the .mtl and its image first: the .obj names them
            _write(path.parent / name, data)
        _write(path, text)
    elif suffix == ".ply":
        _write(path, trimesh.exchange.ply.export_ply(out, encoding="binary", vertex_normal=include_normals))
    else:
        _write(path, trimesh.exchange.stl.export_stl(out))
    return path


def _colours_to_srgb8(colors: np.ndarray) -> np.ndarray:
    """glTF COLOR_0 values (float, or normalized uint8/uint16; RGB or RGBA) -> sRGB uint8 RGBA."""
    c = np.asarray(colors)
    c = c / np.iinfo(c.dtype).max if c.dtype.kind in "iu" else c.astype(np.float64)
    if c.shape[1] == 3:
        c = np.concatenate([c, np.ones((len(c), 1))], axis=1)
    rgb = linear_to_srgb(c[:, :3])
    return np.round(np.concatenate([rgb, np.clip(c[:, 3:], 0, 1)], axis=1) * 255).astype(np.uint8)


def _load_gltf_scene(path: Path, resolver, **kwargs) -> trimesh.Scene:
    """trimesh's glTF loader with COLOR_0 turned linear -> sRGB before trimesh rounds it to 8 bits."""
    from trimesh.exchange.gltf import load_glb, load_gltf

    loader = load_glb if path.suffix.lower() == ".glb" else load_gltf
    with open(path, "rb") as f:
        parsed = loader(f, resolver=resolver, **kwargs)
    for geom in parsed.get("geometry", {}).values():
        if geom.get("vertex_colors") is not None:
            geom["vertex_colors"] = _colours_to_srgb8(geom["vertex_colors"])
        attrs = getattr(geom.get("visual"), "vertex_attributes", {})
        if attrs.get("color") is not None:  # COLOR_0 beside a material
            attrs["color"] = _colours_to_srgb8(attrs["color"])
        geom["process"] = False
    return trimesh.load_scene(parsed)


def load_mesh(path: str | os.PathLike, *, convert_axes: bool = True,
              skip_materials: bool = False) -> trimesh.Trimesh:
    """A mesh file as one trimesh.Trimesh in the world frame (module docstring).

    Scenes are concatenated with their node transforms applied; vertices are not merged or
    reordered. convert_axes=False: the stored coordinates as they are, for callers that know
    what frame a file's numbers are in. An .mtl may name its texture outside the file's folder
    (GSO's ../materials/textures/). Nova3DError for an unknown suffix; any trimesh error otherwise.
    """
    path = Path(path)
    suffix = _suffix(path)
    # allow_anywhere: an .mtl may name its texture as ../textures/x.png (GSO does)
    resolver = trimesh.resolvers.FilePathResolver(str(path), allow_anywhere=True)
    extra = {"skip_materials": True} if skip_materials and suffix in Y_UP_SUFFIXES else {}
    if suffix in (".glb", ".gltf"):
        scene = _load_gltf_scene(path, resolver, **extra)
    else:
        scene = trimesh.load_scene(str(path), resolver=resolver, process=False, **extra)
    mesh = scene.to_mesh() if isinstance(scene, trimesh.Scene) else scene
    if not isinstance(mesh, trimesh.Trimesh):
        raise ValueError(f"{path.name} holds no triangle mesh ({type(mesh).__name__})")
    if convert_axes and suffix in Y_UP_SUFFIXES:
        mesh.apply_transform(Y_UP_TO_Z_UP)
    return mesh


def nonfinite_vertices(path: str | os.PathLike) -> tuple[int, int]:
    """(vertices with a NaN/inf coordinate, all vertices) of a mesh file, node transforms applied.

    Blender's importers read NaN/inf as 0, so a renderer must look at the file itself. Stored
    coordinates (no axis turn), materials skipped; whatever trimesh raises for a file it cannot read.
    """
    path = Path(path)
    extra = {"skip_materials": True} if _suffix(path) in Y_UP_SUFFIXES else {}
    bad = total = 0
    with np.errstate(invalid="ignore", over="ignore"):  # trimesh's face normals of NaN/inf vertices
        scene = trimesh.load_scene(str(path), process=False, **extra)
        for node in scene.graph.nodes_geometry:
            matrix, name = scene.graph[node]
            verts = trimesh.transform_points(np.asarray(scene.geometry[name].vertices, dtype=np.float64), matrix)
            bad += int((~np.isfinite(verts)).any(axis=1).sum())
            total += len(verts)
    return bad, total
