"""Vertex-coloured parts, the building blocks of the built-in objects (data_prep.procedural) and of the
toy family (data_prep.toy_family): kept apart so that neither of those imports the other for them."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import trimesh

Colour = Sequence[float]  # RGB in [0, 1]
_SHARP_DEG = 30.0  # edges sharper than this are split (flat shading across them)


def coloured_part(mesh: trimesh.Trimesh, colour: Colour) -> trimesh.Trimesh:
    """`mesh` in one colour (vertex colours), split at sharp edges so that they shade flat."""
    mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)
    if mesh.is_watertight and mesh.volume < 0:  # normals must point outwards
        mesh.invert()
    split = trimesh.graph.smooth_shade(mesh, angle=math.radians(_SHARP_DEG), facet_minarea=None)
    rgba = np.append(np.round(np.asarray(colour, dtype=float) * 255), 255).astype(np.uint8)
    return trimesh.Trimesh(split.vertices, split.faces, vertex_colors=np.tile(rgba, (len(split.vertices), 1)),
                           process=False)


def combine_parts(parts: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    """One mesh from vertex-coloured parts (trimesh.util.concatenate drops their colours); the
    parts' face counts go to metadata["part_faces"] for solid_object."""
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts[:-1]])
    mesh = trimesh.Trimesh(np.concatenate([p.vertices for p in parts]),
                           np.concatenate([p.faces + o for p, o in zip(parts, offsets)]),
                           vertex_colors=np.concatenate([p.visual.vertex_colors for p in parts]), process=False)
    mesh.metadata["part_faces"] = [len(p.faces) for p in parts]
    return mesh
