"""The real-mesh set of the fusion bench (issue 18): textured, many-part objects that ship with the
pinned `pybullet` package (its pybullet_data folder), rendered exactly as Objaverse objects are.

    python -m data_prep.real_meshes --out DIR [--objects duck mug ...] [--resolution 256]
    make bench-data                       # the whole set into data/real_meshes

Per object:
  DIR/.sources/<name>.glb  the URDF's visual meshes placed at its zero pose by yourdfpy (textures and
                           URDF colours kept), Z up as URDFs are; what Blender imports
  DIR/<name>/              16-view orbit at elevation 0° with depth (data_prep.render_views), and
                           mesh.glb + mesh.json, the GT in the renders' frame, checked against their
                           masks (data_prep.gt_mesh)
  DIR/.heldout/<name>/     8 more views of the same object between the orbit's azimuths (11.25° + k·45°)
                           at elevation +20° / -20° alternately: texture scored only at the fitted views
                           flatters it
DIR is a GT folder `nova3d eval --gt DIR` reads (dot folders are not objects). Resumable (finished folders are kept); exit status 0 all done, 1 some objects failed (listed, the
others done), 2 unusable arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.gt_mesh import GT_MESH, write_gt_mesh
from data_prep.render_io import ObjectSource, RenderSettings, heldout_settings
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.mesh_io import Y_UP_TO_Z_UP

HELDOUT_DIR, SOURCES_DIR = ".heldout", ".sources"  # dot folders: DIR stays a GT folder for `nova3d eval --gt`
_PYBULLET_DATA = "pybullet_data (pip pybullet==3.2.7; bullet3 repository, zlib licence unless noted)"


@dataclass(frozen=True)
class RealObject:
    name: str
    urdf: str  # a URDF or one .obj, inside pybullet_data (or an absolute path)
    traits: str  # what it asks of the fusion
    origin: str = _PYBULLET_DATA
    y_up: bool = False  # stored Y up (pybullet shows it lying on its side): stood up for the bench


REAL_SET = {o.name: o for o in (
    RealObject("duck", "duck_vhacd.urdf", "smooth, one textured part",
               "pybullet_data duck.obj: the COLLADA/glTF sample duck (Sony Computer Entertainment, SCEA Shared "
               "Source Licence)", y_up=True),
    RealObject("mug", "objects/mug.urdf", "cavity (the cup) and a handle loop"),
    RealObject("teddy", "teddy_large.urdf", "organic, convex-hull pieces, untextured", y_up=True),
    RealObject("table", "table/table.urdf", "four thin legs under a textured top"),
    RealObject("tray", "tray/tray.urdf", "open box: a cavity seen from the side only"),
    RealObject("racecar", "racecar/racecar.urdf", "wheels, cavities, textured tyres, many parts"),
    RealObject("r2d2", "r2d2.urdf", "many coloured parts, thin arms"),
    RealObject("kuka", "kuka_iiwa/model.urdf", "tall mechanical arm of seven links"),
    RealObject("torus", "torus/torus_textured.obj", "ring: a hole through it (its .mtl names no image here: grey)"),
    RealObject("a1", "a1/a1.urdf", "quadruped: four thin legs, textured trunk",
               "pybullet_data a1 (Unitree A1 description)"),
)}
QUICK_SET = ("duck", "table")  # the slow test tier's --quick: one smooth, one with thin legs


def pybullet_data_dir() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath())


def assemble(obj: RealObject) -> list:
    """The URDF's visual meshes at the zero joint pose, each moved to its world pose, or an OBJ's parts
    (Z up as pybullet shows them, or stood up when `obj.y_up`; metres)."""
    import logging

    import trimesh
    import yourdfpy

    # pybullet_data's URDFs say version="0.0": yourdfpy logs an error and parses them anyway
    logging.getLogger("yourdfpy").setLevel(logging.CRITICAL)
    urdf = Path(obj.urdf) if Path(obj.urdf).is_absolute() else pybullet_data_dir() / obj.urdf
    if not urdf.is_file():
        raise Nova3DError(f"{urdf}: not found (is pybullet==3.2.7 installed? make setup)")
    if urdf.suffix == ".obj":
        scene = trimesh.load_scene(str(urdf))
    else:
        scene = yourdfpy.URDF.load(str(urdf), mesh_dir=str(urdf.parent), build_collision_scene_graph=False,
                                   load_collision_meshes=False).scene
    parts = []
    for node in scene.graph.nodes_geometry:
        transform, geom = scene.graph[node]
        mesh = scene.geometry[geom].copy()
        finite = np.isfinite(mesh.vertices).all(axis=1)
        if not finite.all():  # a few pybullet_data meshes carry NaN vertices: drop their faces
            mesh.update_faces(finite[mesh.faces].all(axis=1))
            mesh.remove_unreferenced_vertices()
        if len(mesh.faces):
            parts.append(mesh.apply_transform((Y_UP_TO_Z_UP if obj.y_up else np.eye(4)) @ transform))
    if not parts:
        raise Nova3DError(f"{urdf}: no visual geometry")
    return parts


def write_source(obj: RealObject, out: Path) -> Path:
    """out/sources/<name>.glb, kept when there (nova3d.mesh_io.save_parts: atomic)."""
    from nova3d.mesh_io import save_parts

    path = out / SOURCES_DIR / f"{obj.name}.glb"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_parts(assemble(obj), path)
    return path


def prepare_real(out: str | Path, names: list[str] | None = None, settings: RenderSettings | None = None,
                 progress: bool = True) -> list[dict]:
    """Sources, orbit + GT, held-out views for `names` (default: all) into `out`; the failures as
    {"object", "reason"} records (module docstring). Finished objects are kept."""
    from data_prep.render_views import render_objects

    out = Path(out)
    names = list(REAL_SET) if names is None else names
    unknown = [n for n in names if n not in REAL_SET]
    if unknown:
        raise Nova3DError(f"--objects: {', '.join(unknown)} not in the real set ({', '.join(REAL_SET)})")
    settings = settings or RenderSettings(depth=True)
    out.mkdir(parents=True, exist_ok=True)
    sources, failed = [], []
    for name in names:
        try:
            path = write_source(REAL_SET[name], out)
            sources.append(ObjectSource(name, f"{REAL_SET[name].urdf} (pybullet_data)", path=path))
        except (OSError, ValueError, Nova3DError) as err:
            failed.append({"object": name, "reason": f"assembling {REAL_SET[name].urdf}: {err}"})
    summary = render_objects(sources, out, settings, progress=progress)
    failed += [{"object": f["object"], "reason": f["reason"]} for f in summary.failed]
    summary = render_objects(sources, out / HELDOUT_DIR, heldout_settings(settings), progress=progress)
    failed += [{"object": f["object"], "reason": f["reason"]} for f in summary.failed]
    for source in sources:
        folder = out / source.object_id
        if (folder / schema.META_FILE).is_file() and not (folder / GT_MESH).is_file():
            try:
                write_gt_mesh(source, folder)
            except Exception as err:  # one bad object must not stop the others
                failed.append({"object": source.object_id, "reason": f"GT mesh: {err}"})
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.real_meshes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the rendered set (e.g. data/real_meshes)")
    p.add_argument("--objects", nargs="+", metavar="NAME", help=f"only these ({', '.join(REAL_SET)})")
    p.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK_SET)}")
    p.add_argument("--resolution", type=int, default=RenderSettings().resolution)
    p.add_argument("--list", action="store_true", help="print the set (name, URDF, traits, origin) and exit")
    args = p.parse_args(argv)
    if args.list:
        for o in REAL_SET.values():
            print(f"{o.name:8s} {o.urdf:28s} {o.traits}; from {o.origin}")
        return 0
    names = list(QUICK_SET) if args.quick else args.objects
    try:
        failed = prepare_real(args.out, names, RenderSettings(resolution=args.resolution, depth=True))
    except Nova3DError as err:
        print(f"real_meshes: error: {err}", file=sys.stderr)
        return 2
    for record in failed:
        print(f"failed {record['object']}: {record['reason']}", file=sys.stderr)
    print(f"real set in {args.out}: {len(names or REAL_SET) - len(failed)} ready, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
