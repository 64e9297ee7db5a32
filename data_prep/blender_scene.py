"""Preparing a Blender scene for rendering: import a mesh, fit it in the unit box, fix materials.

bpy (Blender as a Python module) is imported lazily, on first use, through `_blender()`; the
rest of the pipeline imports it from here, so this is the only place that imports bpy.
"""
from __future__ import annotations

import atexit
import functools
from pathlib import Path

import numpy as np

from data_prep.render_io import MESH_SUFFIXES
from nova3d import mesh_io

_GEOMETRY = {"MESH", "CURVE", "SURFACE", "META", "FONT"}


class MeshError(Exception):
    """This object cannot be rendered (corrupt, empty, unsupported): a failures.jsonl entry."""


@functools.cache
def _blender():
    """The bpy module, imported on first use.

    The glTF add-on leaves bpy types in `typing`'s caches; freed after Python has shut
    down they crash the process at exit (SIGSEGV in bpy_class_free). Clearing those caches
    at exit, while Python still runs, avoids it.
    """
    import typing

    import bpy

    atexit.register(lambda: [clear() for clear in getattr(typing, "_cleanups", [])])
    return bpy


def import_mesh(path: Path) -> None:
    """Import a mesh file into the current (empty) scene; MeshError if Blender cannot."""
    bpy = _blender()
    suffix = path.suffix.lower()
    importers = {".glb": bpy.ops.import_scene.gltf, ".gltf": bpy.ops.import_scene.gltf, ".obj": bpy.ops.wm.obj_import,
                 ".ply": bpy.ops.wm.ply_import, ".stl": bpy.ops.wm.stl_import, ".fbx": bpy.ops.import_scene.fbx}
    if suffix not in importers:
        raise MeshError(f"unsupported format {suffix or '(no suffix)'}; expected one of {', '.join(MESH_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise MeshError("empty file")
    check_finite_vertices(path)
    try:
        result = importers[suffix](filepath=str(path))
    except Exception as err:  # Blender raises RuntimeError with the importer's message
        message = str(err).strip().splitlines()
        raise MeshError(f"import failed: {message[-1] if message else type(err).__name__}") from err
    if "FINISHED" not in result:
        raise MeshError(f"import failed: importer returned {sorted(result)}")


def check_finite_vertices(path: Path) -> None:
    """MeshError if the file has NaN/inf vertex coordinates: Blender's importers read them as 0,
    so the scene (and normalise_scene's finite check) would never show them."""
    if path.suffix.lower() not in mesh_io.MESH_SUFFIXES:  # .fbx: trimesh cannot read it
        return
    try:
        bad, total = mesh_io.nonfinite_vertices(path)
    except Exception:  # trimesh cannot read it: Blender's importer is the judge (and reports why)
        return
    if bad:
        raise MeshError(f"{path.name}: {bad} of {total} vertices have non-finite coordinates (NaN/inf)")


def _world_vertices(obj, depsgraph) -> tuple[np.ndarray, int]:
    """World-space vertices [N, 3] and face count of an object as rendered (modifiers, pose applied)."""
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        coords = np.empty(len(mesh.vertices) * 3, dtype=np.float64)
        mesh.vertices.foreach_get("co", coords)
        faces = len(mesh.polygons)
    finally:
        evaluated.to_mesh_clear()
    matrix = np.array(evaluated.matrix_world)
    return coords.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3], faces


def normalise_scene() -> dict:
    """Scale and centre all geometry into a unit box at the origin; returns meta's normalisation.

    Lights and cameras that came with the file are removed so every object is lit alike.
    The transform goes on a new root empty, so hierarchies, instances and rigs stay intact.
    """
    bpy = _blender()
    from mathutils import Matrix

    for obj in [o for o in bpy.data.objects if o.type in {"LIGHT", "CAMERA", "LIGHT_PROBE"}]:
        bpy.data.objects.remove(obj, do_unlink=True)
    depsgraph = bpy.context.evaluated_depsgraph_get()
    geometry = [o for o in bpy.context.scene.objects if o.type in _GEOMETRY]
    found = [_world_vertices(o, depsgraph) for o in geometry]
    if not any(faces for _, faces in found):
        raise MeshError("no geometry: the file holds no faces (empty, or points/edges only)")
    points = np.concatenate([v for v, _ in found])
    low, high = points.min(axis=0), points.max(axis=0)
    extent = float((high - low).max())
    if not np.isfinite(extent) or extent < 1e-9:
        raise MeshError(f"degenerate geometry: bounding box extent {extent:g}")
    scale, offset = 1.0 / extent, -(low + high) / 2 + 0.0  # + 0.0: no "-0.0" in meta.json
    root = bpy.data.objects.new("nova3d_normalise", None)
    bpy.context.scene.collection.objects.link(root)
    for obj in list(bpy.context.scene.objects):
        if obj.parent is None and obj is not root:
            obj.parent = root
            obj.matrix_parent_inverse = Matrix.Identity(4)
    root.matrix_world = Matrix.Scale(scale, 4) @ Matrix.Translation(offset.tolist())
    return {"scale": scale, "offset": offset.tolist(), "frame": "blender_world",
            "note": "v' = (v + offset) * scale, v in Blender world coordinates after import "
                    "(glTF/OBJ are converted from Y-up to Z-up by Blender's importers)",
            "vertices": int(len(points))}


def _upstream_has(node, bl_idname: str, seen: set | None = None) -> bool:
    """Whether a node of type `bl_idname` feeds `node`, directly or not."""
    seen = set() if seen is None else seen
    for socket in node.inputs:
        for link in socket.links:
            upstream = link.from_node
            if upstream.bl_idname == bl_idname:
                return True
            if upstream.name not in seen:
                seen.add(upstream.name)
                if _upstream_has(upstream, bl_idname, seen):
                    return True
    return False


def _wire_vertex_colours(material, attribute: str) -> None:
    """Multiply the base colour by a colour attribute, unless a texture/attribute already feeds it."""
    tree = material.node_tree
    bsdf = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"), None)
    if bsdf is None:
        return
    base = bsdf.inputs["Base Color"]
    if base.is_linked and (_upstream_has(bsdf, "ShaderNodeTexImage") or _upstream_has(bsdf, "ShaderNodeVertexColor")):
        return
    colour = tree.nodes.new("ShaderNodeVertexColor")
    colour.layer_name = attribute
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type, mix.blend_type = "RGBA", "MULTIPLY"
    mix.inputs["Factor"].default_value = 1.0
    if base.is_linked:
        tree.links.new(base.links[0].from_socket, mix.inputs["A"])
    else:
        mix.inputs["A"].default_value = base.default_value
    tree.links.new(colour.outputs["Color"], mix.inputs["B"])
    tree.links.new(mix.outputs["Result"], base)


def prepare_materials() -> None:
    """Make vertex colours visible: give bare meshes a material and wire colour attributes in.

    A texture image that cannot be loaded would render magenta: MeshError instead.
    """
    bpy = _blender()
    for image in bpy.data.images:
        if image.source == "FILE" and image.users and tuple(image.size) == (0, 0):  # .size loads it
            raise MeshError(f"texture image {image.filepath or image.name!r} cannot be loaded")
    for obj in [o for o in bpy.context.scene.objects if o.type == "MESH"]:
        mesh = obj.data
        attribute = mesh.color_attributes.active_color_name if len(mesh.color_attributes) else None
        if not any(slot.material for slot in obj.material_slots):
            material = bpy.data.materials.new(f"nova3d_{obj.name}")
            material.use_nodes = True
            material.node_tree.nodes["Principled BSDF"].inputs["Base Color"].default_value = (0.8, 0.8, 0.8, 1)
            mesh.materials.clear()
            mesh.materials.append(material)
        if attribute is None:
            continue
        for slot in obj.material_slots:
            if slot.material is not None and slot.material.use_nodes:
                _wire_vertex_colours(slot.material, attribute)
