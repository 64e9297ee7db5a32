"""The toy recipe's object family: thousands of distinct procedural objects from (seed, index).

Each object is a composite of 2-4 primitives (box, cylinder, cone, sphere, torus, capsule) with
random proportions, placement, turn and one colour per part; about one part in five is thin (a rod
or a plate) and tori and stacked parts make concavities. Everything is drawn from
numpy's generator seeded by (seed, index) alone, so an object is the same on every machine and
in every process, and no object depends on how many others were made.

Splits are by index (`split_of`): every 20th index from 0 is test, from 1 is val, the rest train,
so a larger family keeps the objects, and the splits, of a smaller one.

    toy_object(0, 42)               # a trimesh.Trimesh in Blender's world frame (Z up, front -Y)
    toy_name(0, 42)                 # "toy-s0-00042": the procedural name render_views accepts
    indices("test", 0, 400)         # [0, 20, 40, ...]
"""
from __future__ import annotations

import colorsys
import math
import re
from typing import Sequence

import numpy as np
import trimesh

from data_prep.coloured_parts import coloured_part, combine_parts

PRIMITIVES = ("box", "cylinder", "cone", "sphere", "torus", "capsule")
SPLITS = ("train", "val", "test")
SPLIT_PERIOD = 20  # index % 20: 0 -> test, 1 -> val, else train
THIN_PROBABILITY = 0.2
_NAME = re.compile(r"^toy-s(\d+)-(\d+)$")


def split_of(index: int) -> str:
    """The split an object index belongs to (disjoint by construction)."""
    return {0: "test", 1: "val"}.get(index % SPLIT_PERIOD, "train")


def indices(split: str, start: int, stop: int) -> list[int]:
    """The indices in [start, stop) of `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [i for i in range(start, stop) if split_of(i) == split]


def toy_name(seed: int, index: int) -> str:
    """The procedural name (and object id) of object `index` of family `seed`."""
    return f"toy-s{seed}-{index:05d}"


def parse_toy_name(name: str) -> tuple[int, int] | None:
    """(seed, index) of a toy_name, or None for any other name."""
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A saturated, not too dark colour: parts must stand apart from each other and from white."""
    return colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.45, 0.95))


def _primitive(kind: str, rng: np.random.Generator, thin: bool) -> trimesh.Trimesh:
    """A primitive of random proportions standing on z = 0, centred on the z axis."""
    if thin:  # a rod (cylinder) or a plate (box): one or two dimensions of a few hundredths
        if kind in ("cylinder", "cone", "capsule", "torus"):
            r, h = rng.uniform(0.025, 0.045), rng.uniform(0.35, 0.7)
            mesh = trimesh.creation.cylinder(radius=r, height=h, sections=16)
        else:
            ext = [rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6), rng.uniform(0.03, 0.05)]
            if rng.random() < 0.5:  # standing plate
                ext = [ext[0], ext[2], ext[1]]
            mesh = trimesh.creation.box(extents=ext)
    elif kind == "box":
        mesh = trimesh.creation.box(extents=rng.uniform(0.2, 0.55, 3))
    elif kind == "cylinder":
        mesh = trimesh.creation.cylinder(radius=rng.uniform(0.1, 0.28), height=rng.uniform(0.15, 0.6), sections=32)
    elif kind == "cone":
        mesh = trimesh.creation.cone(radius=rng.uniform(0.12, 0.3), height=rng.uniform(0.2, 0.6), sections=32)
    elif kind == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
        mesh.apply_scale(rng.uniform(0.12, 0.3, 3))  # an ellipsoid
    elif kind == "torus":
        major = rng.uniform(0.14, 0.26)
        mesh = trimesh.creation.torus(major, major * rng.uniform(0.2, 0.45), major_sections=32, minor_sections=12)
        if rng.random() < 0.5:  # standing ring: its hole faces the cameras
            mesh.apply_transform(trimesh.transformations.rotation_matrix(math.pi / 2, (1, 0, 0)))
    elif kind == "capsule":
        mesh = trimesh.creation.capsule(height=rng.uniform(0.1, 0.4), radius=rng.uniform(0.07, 0.16), count=(16, 16))
    else:
        raise ValueError(f"unknown primitive {kind!r}")
    lo, hi = mesh.bounds
    mesh.apply_translation([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, -lo[2]])
    return mesh


def toy_parts(seed: int, index: int) -> list[tuple[trimesh.Trimesh, tuple[float, float, float]]]:
    """The object's parts with their colours: the first stands on the ground, each next one is
    stacked on top of a part placed before it or set beside it, so that the parts touch."""
    rng = np.random.default_rng([seed, index])
    parts: list[tuple[trimesh.Trimesh, tuple[float, float, float]]] = []
    for k in range(int(rng.integers(2, 5))):
        kind = PRIMITIVES[int(rng.integers(len(PRIMITIVES)))]
        mesh = _primitive(kind, rng, thin=bool(rng.random() < THIN_PROBABILITY))
        turn = trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * math.pi), (0, 0, 1))
        mesh.apply_transform(turn)
        if k > 0:
            anchor = parts[int(rng.integers(len(parts)))][0]
            lo, hi = anchor.bounds
            centre = (lo + hi) / 2
            if rng.random() < 0.6:  # on top, a little off centre
                shift = rng.uniform(-0.35, 0.35, 2) * (hi[:2] - lo[:2])
                mesh.apply_translation([centre[0] + shift[0], centre[1] + shift[1], hi[2] - 0.01])
            else:  # beside it, on the ground, along a random direction
                angle = rng.uniform(0, 2 * math.pi)
                d = np.array([math.cos(angle), math.sin(angle)])
                reach = 0.5 * (np.abs(d) @ (hi[:2] - lo[:2])) + 0.5 * (np.abs(d) @ (mesh.bounds[1, :2] - mesh.bounds[0, :2]))
                mesh.apply_translation([centre[0] + d[0] * 0.9 * reach, centre[1] + d[1] * 0.9 * reach, lo[2]])
        parts.append((mesh, _colour(rng)))
    return parts


def toy_object(seed: int, index: int) -> trimesh.Trimesh:
    """Object `index` of family `seed`: vertex-coloured parts in one mesh (procedural._combine)."""
    return combine_parts([coloured_part(mesh, colour) for mesh, colour in toy_parts(seed, index)])


def toy_names(seed: int, idx: Sequence[int]) -> list[str]:
    return [toy_name(seed, i) for i in idx]
