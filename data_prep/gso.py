"""GSO preparation: render a local Google Scanned Objects folder into evaluation ground truth.

    python -m data_prep.gso --gso GSO_DIR --out GT_DIR [--protocol NAME] [--limit N] [--objects ID ...]
                            [--obj-up z|y] [--gt-turns syncdreamer]
    python -m data_prep.gso --convert-meshes PEER_DIR --frame syncdreamer --out PRED_DIR

Input (the GSO release, unzipped): GSO_DIR/<object_id>/meshes/model.obj (+ model.mtl and
materials/textures/texture.png), or GSO_DIR/<name>/model.obj as SyncDreamer's gso-eval folders hold
them. GSO's OBJs are stored Z-up (every object rests on z = 0; checked on SyncDreamer's chicken GT
depth renders, docs/evaluation.md), so each is read AS STORED by default (--obj-up z): a Y-up copy
is staged under GT_DIR/.staging/ for Blender's OBJ importer (which turns Y-up to Z-up), and the
object stands upright, its -Y side facing view 0. --obj-up y reads the OBJ as a Y-up file (what
this module did before: GSO objects lay on their side). --gt-turns syncdreamer turns each object as
SyncDreamer's GT renders show it (nova3d.eval.protocols.SYNCDREAMER_GSO30: its per-object turn about
Z, then its frame's input camera +X onto ours on -Y); the object ids must be SyncDreamer's short
names (chicken may be CHICKEN_NESTING). Output, what `nova3d eval --gt GT_DIR` reads:

    GT_DIR/<object_id>/   an object folder rendered by data_prep.render_views (the same Blender
                          import, unit-box normalisation, lighting and cameras as training data) at
                          the protocol's orbit (nova3d.eval.protocols): 16 views at 256², view 0 =
                          input, depth on; elevation 0° and FOV 49.1° for `nova3d`/`eschernet`/
                          `aligned`, elevation 30° and f = 280 px (FOV 49.13°) for `syncdreamer`
    GT_DIR/<object_id>/mesh.glb   the GT mesh in that same normalised world frame, stored by
                          nova3d.mesh_io (glTF Y-up in the file; mesh_io.load_mesh gives back Z-up)
    GT_DIR/<object_id>/mesh.json  how mesh.glb was made and the render/mesh agreement check

mesh.glb is the staged OBJ as nova3d.mesh_io.load_mesh reads it, turned Y-up -> Z-up exactly as Blender's
OBJ importer does (its defaults: forward -Z, up Y) -- i.e. the GSO OBJ as stored, times mesh.json's
`turn` -- then moved by meta.json's normalisation (v' = (v + offset) * scale).
Before it is written, every vertex is projected with cameras.json into the masks Blender rendered:
if more than MAX_OUTSIDE of them miss (the two disagree), the object is a failure, not ground truth,
and its renders move to GT_DIR/rejected/ (delete them there to try again).
Resumable: objects with both the folder and mesh.glb are skipped (when their cameras are at the
protocol's orbit: a GT folder holds one orbit, so another protocol's GT needs another --out); failures are listed in
GT_DIR/failures.jsonl. Exit status (as data_prep.render_views): 0 all done, 1 some objects failed
(the others done), 2 unusable input or arguments.

--convert-meshes: a peer method's meshes are stored in its own world frame. This writes each of
PEER_DIR's meshes (PEER/<id>.{glb,obj,ply} or PEER/<id>/mesh.*) as PRED_DIR/<id>.glb in nova3d's
frame, turned by nova3d.eval.normalize.FRAME_TO_NOVA3D[--frame] (syncdreamer: its input camera on
+X becomes ours on -Y; nothing else changes: no rescaling, no recentring). `nova3d eval
--pred-frame syncdreamer` does the same turn on the fly; the conversion is recorded in
PRED_DIR/frame.json. SyncDreamer also turned 19 GSO objects about Z before rendering its GT
(eval_mesh.py get_gt_rotate_angle): --gt-turns syncdreamer renders the GT that way instead.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.render_io import FAILURES_FILE, ObjectSource, RenderSettings, append_failure
from nova3d.atomic import write_json_atomic
from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.errors import Nova3DError
from data_prep.gt_mesh import GT_MESH, write_gt_mesh
from nova3d.mesh_io import Y_UP_TO_Z_UP, load_mesh, save_mesh

MODEL = Path("meshes") / "model.obj"
FLAT_MODEL = Path("model.obj")  # SyncDreamer's / HarmonyView's gso-eval/<name>/model.obj
STAGING_DIR = ".staging"  # the Y-up OBJ copies Blender imports (removed after each run)
OBJ_UPS = ("z", "y")  # GSO's OBJs are Z-up
GT_TURNS = ("syncdreamer",)
REJECTED_DIR = "rejected"  # renders whose mesh disagreed with them: kept for a look, never evaluated


@dataclass
class GsoSummary:
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # folder and mesh.glb already there
    meshes_written: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"object", "source", "reason"}

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0  # 2 is the CLI's, for unusable input

    def describe(self) -> str:
        return (f"rendered {len(self.rendered)}, skipped {len(self.skipped)} (already done), "
                f"GT meshes written {len(self.meshes_written)}, failed {len(self.failed)}")


def find_objects(gso_dir: Path) -> tuple[list[ObjectSource], list[dict]]:
    """(an ObjectSource per object folder with meshes/model.obj, failure records for folders without)."""
    if not gso_dir.is_dir():
        raise Nova3DError(f"{gso_dir}: GSO folder not found")
    sources, problems = [], []
    for folder in sorted(p for p in gso_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        obj = folder / MODEL if (folder / MODEL).is_file() else folder / FLAT_MODEL
        object_id = schema.safe_object_id(folder.name)
        if obj.is_file():
            sources.append(ObjectSource(object_id, str(obj.resolve()), path=obj))
        else:
            problems.append({"object": object_id, "source": str(folder), "reason": f"no {MODEL} in {folder}"})
    if not sources and not problems:
        raise Nova3DError(f"{gso_dir}: no object folders (expected <object_id>/{MODEL})")
    return sources, problems


def gt_turn(object_id: str, obj_up: str = "z", turns: str | None = None) -> np.ndarray:
    """[3, 3] rotation from the OBJ as read (Z up; with obj_up "y": after the Y-up -> Z-up turn) to the
    GT's world frame: identity, or with turns="syncdreamer" SyncDreamer's per-object turn followed by
    its frame's turn into nova3d's (ValueError for an object not in its split)."""
    if obj_up not in OBJ_UPS:
        raise Nova3DError(f"--obj-up must be one of {', '.join(OBJ_UPS)}, not {obj_up!r}")
    if turns is None:
        return np.eye(3)
    if turns not in GT_TURNS:
        raise Nova3DError(f"--gt-turns must be one of {', '.join(GT_TURNS)}, not {turns!r}")
    import math

    from nova3d.eval.normalize import FRAME_TO_NOVA3D
    from nova3d.eval.protocols import SYNCDREAMER_GSO30, SYNCDREAMER_GSO_IDS

    name = {v: k for k, v in SYNCDREAMER_GSO_IDS.items()}.get(object_id, object_id)
    if name not in SYNCDREAMER_GSO30:
        raise ValueError(f"not in SyncDreamer's GSO 30-object split (--gt-turns syncdreamer needs its short "
                         f"names: {', '.join(SYNCDREAMER_GSO30)})")
    a = -math.radians(SYNCDREAMER_GSO30[name])  # eval_mesh.py transform_gt: Rz(-angle)
    rz = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return np.asarray(FRAME_TO_NOVA3D["syncdreamer"]) @ rz


def stage_obj(source: ObjectSource, staging: Path, rotation: np.ndarray, obj_up: str = "z") -> ObjectSource:
    """A copy of the source OBJ whose Blender (Y-up) import gives `rotation` @ (the OBJ as stored, Z up),
    or with obj_up "y" `rotation` @ (the OBJ turned Y-up -> Z-up); v and vn lines are rewritten, every
    other line and file (model.mtl, textures: linked) stays as it is. meta.json keeps the source path."""
    to_file = Y_UP_TO_Z_UP[:3, :3].T @ rotation @ (Y_UP_TO_Z_UP[:3, :3] if obj_up == "y" else np.eye(3))
    src = Path(source.path)
    nested = src.parent.name == "meshes"  # GSO's layout: <id>/meshes/model.obj, <id>/materials/...
    folder = staging / source.object_id
    if folder.exists():
        shutil.rmtree(folder)
    model_dir = folder / "meshes" if nested else folder
    model_dir.mkdir(parents=True)
    for entry in src.parent.iterdir():  # model.mtl, a texture beside it
        if entry.name != src.name:
            (model_dir / entry.name).symlink_to(entry.resolve())
    if nested:
        for entry in src.parent.parent.iterdir():  # materials/textures/texture.png (model.mtl: ../materials/...)
            if entry.name != "meshes":
                (folder / entry.name).symlink_to(entry.resolve())
    lines = []
    with open(src, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("v", "vn") and len(parts) >= 4:
                xyz = to_file @ np.array([float(x) for x in parts[1:4]])
                rest = " ".join(parts[4:])
                line = f"{parts[0]} {xyz[0]:.9g} {xyz[1]:.9g} {xyz[2]:.9g}{' ' + rest if rest else ''}\n"
            lines.append(line)
    staged = model_dir / src.name
    with open(staged, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(lines)
    return ObjectSource(source.object_id, source.source, path=staged)


def _orbit_mismatch(folder: Path, settings: RenderSettings) -> str | None:
    """Why an already rendered GT folder is not at `settings`' orbit (None when it is)."""
    cams = Cameras.load(folder / schema.CAMERAS_FILE)
    el = cams.elevation_deg.float()
    if (len(cams) != settings.views or float((el - settings.elevation[0]).abs().max()) > 0.5
            or abs(cams.fov_deg - settings.fov) > 0.1):
        return (f"{folder} holds {len(cams)} views at elevation {float(el.min()):g}°, FOV {cams.fov_deg:.2f}°; "
                f"the protocol needs {settings.views} at {settings.elevation[0]:g}°, FOV {settings.fov:.2f}°: "
                "prepare this protocol's GT into another --out")
    return None


def convert_peer_meshes(src_dir: str | Path, out_dir: str | Path, frame: str) -> list[Path]:
    """Every mesh of a peer's prediction folder, turned from its `frame` into nova3d's world frame and
    written as out_dir/<id>.glb (module docstring); Nova3DError for an unusable folder or frame."""
    from nova3d.eval.normalize import FRAME_TO_NOVA3D, frame_rotation
    from nova3d.eval.protocol import PRED_SUFFIXES

    src, out = Path(src_dir), Path(out_dir)
    if frame not in FRAME_TO_NOVA3D:
        raise Nova3DError(f"--frame {frame!r}: known frames are {', '.join(FRAME_TO_NOVA3D)}")
    if not src.is_dir():
        raise Nova3DError(f"--convert-meshes {src}: folder not found")
    found = {}
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix.lower() in PRED_SUFFIXES:
            found.setdefault(path.stem, path)
        elif path.is_dir():
            for suffix in PRED_SUFFIXES:
                if (path / f"mesh{suffix}").is_file():
                    found.setdefault(path.name, path / f"mesh{suffix}")
                    break
    if not found:
        raise Nova3DError(f"--convert-meshes {src}: no <id>.{{glb,obj,ply}} or <id>/mesh.* files")
    turn = np.eye(4)
    turn[:3, :3] = frame_rotation(frame).numpy()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for object_id, path in found.items():
        try:
            mesh = load_mesh(path)
        except Exception as err:  # every loader fails its own way on a corrupt file
            raise Nova3DError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
        mesh.apply_transform(turn)
        save_mesh(mesh, out / f"{object_id}.glb")
        written.append(out / f"{object_id}.glb")
    write_json_atomic(out / "frame.json", {"source": str(src.resolve()), "frame": frame, "rotation_to_nova3d":
                                           turn[:3, :3].tolist(), "objects": sorted(found)})
    return written


def prepare_gso(gso_dir: str | Path, out_dir: str | Path, protocol: str = "nova3d", *, limit: int | None = None,
                objects: list[str] | None = None, samples: int = 8, resolution: int | None = None,
                device: str = "auto", progress: bool = True, obj_up: str = "z",
                turns: str | None = None) -> GsoSummary:
    """Render GSO objects and write their GT meshes (module docstring); resumable."""
    from data_prep.render_views import render_objects
    from nova3d.eval.protocol import get_protocol

    proto = get_protocol(protocol)
    gt_turn("", obj_up)  # checks obj_up
    if turns is not None and turns not in GT_TURNS:
        raise Nova3DError(f"--gt-turns must be one of {', '.join(GT_TURNS)}, not {turns!r}")
    gso_dir, out = Path(gso_dir), Path(out_dir)
    sources, problems = find_objects(gso_dir)
    if objects:
        known = {s.object_id for s in sources} | {p["object"] for p in problems}
        unknown = [o for o in objects if o not in known]
        if unknown:
            raise Nova3DError(f"--objects: {', '.join(unknown)} not in {gso_dir}")
        sources = [s for s in sources if s.object_id in objects]
        problems = [p for p in problems if p["object"] in objects]
    if limit is not None:
        sources = sources[:limit]
    settings = RenderSettings(views=proto.num_views or 16, resolution=resolution or proto.image_size,
                              elevation=(proto.elevation_deg,), fov=proto.fov_deg, radius=proto.radius,
                              samples=samples, depth=True, device=device)
    summary = GsoSummary()
    out.mkdir(parents=True, exist_ok=True)
    for record in problems:
        append_failure(out, record)
        summary.failed.append(record)
    done = [s for s in sources if (out / s.object_id / GT_MESH).is_file()]
    for source in list(done):
        reason = _orbit_mismatch(out / source.object_id, settings)
        if reason:
            done.remove(source)
            summary.failed.append({"object": source.object_id, "source": source.source, "reason": reason})
    summary.skipped = [s.object_id for s in done]
    mismatched = {f["object"] for f in summary.failed}
    rejected = [s for s in sources if (out / REJECTED_DIR / s.object_id).exists()]
    for source in rejected:
        summary.failed.append({"object": source.object_id, "source": source.source,
                               "reason": f"rejected earlier (see {FAILURES_FILE}); delete "
                                         f"{out / REJECTED_DIR / source.object_id} to try again"})
    todo = [s for s in sources if s not in done and s not in rejected and s.object_id not in mismatched]
    staging, staged = out / STAGING_DIR, {}
    for source in todo:
        try:
            rotation = gt_turn(source.object_id, obj_up, turns)
            staged[source.object_id] = (stage_obj(source, staging, rotation, obj_up),
                                        {"obj_up": obj_up, "gt_turns": turns, "turn": rotation.round(12).tolist(),
                                         "staged_from": source.source})
        except (OSError, ValueError) as err:
            record = {"object": source.object_id, "source": source.source, "reason": f"staging the OBJ: {err}"}
            append_failure(out, record)
            summary.failed.append(record)
    try:
        rendered = render_objects([staged[s.object_id][0] for s in todo if s.object_id in staged], out, settings,
                                  progress=progress)
        summary.rendered, summary.failed = rendered.rendered, summary.failed + rendered.failed
        _write_gt_meshes(todo, staged, out, summary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _write_gt_meshes(todo: list[ObjectSource], staged: dict, out: Path, summary: GsoSummary) -> None:
    for source in todo:
        folder = out / source.object_id
        if source.object_id not in staged or not (folder / schema.META_FILE).is_file():  # failed (listed)
            continue
        try:
            write_gt_mesh(staged[source.object_id][0], folder, staging=staged[source.object_id][1])
            summary.meshes_written.append(source.object_id)
        except Exception as err:  # one bad object must not stop the run
            record = {"object": source.object_id, "source": source.source, "reason": f"GT mesh: {err}"}
            append_failure(out, record)
            summary.failed.append(record)
            (out / REJECTED_DIR).mkdir(exist_ok=True)
            shutil.move(str(folder), str(out / REJECTED_DIR / source.object_id))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.gso", description=__doc__.split("\n\n")[0])
    p.add_argument("--gso", help="GSO folder: <object_id>/meshes/model.obj")
    p.add_argument("--out", required=True, help="ground-truth folder for nova3d eval --gt (or converted meshes)")
    p.add_argument("--convert-meshes", metavar="PEER_DIR", help="instead: turn a peer's meshes into nova3d's frame")
    p.add_argument("--frame", default=None, help="with --convert-meshes: the peer's frame (syncdreamer)")
    p.add_argument("--limit", type=int, default=None, help="at most this many objects (in name order)")
    p.add_argument("--objects", nargs="+", metavar="ID", help="only these object ids")
    p.add_argument("--protocol", default="nova3d", help="evaluation protocol whose orbit is rendered "
                   "(nova3d, syncdreamer, eschernet, aligned; see nova3d eval --list-protocols)")
    p.add_argument("--obj-up", default="z", help="the OBJs' up axis (GSO: z, the default; "
                   "y reads them as Y-up files, laying GSO objects on their side)")
    p.add_argument("--gt-turns", default=None, help="turn each object as SyncDreamer's GT "
                   "renders show it (object ids: its short names, nova3d.eval.protocols.SYNCDREAMER_GSO30)")
    p.add_argument("--samples", type=int, default=RenderSettings().samples, help="Cycles samples per pixel")
    p.add_argument("--resolution", type=int, default=None, help="override the protocol's image size")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    args = p.parse_args(argv)
    try:
        if args.convert_meshes is not None:
            if args.frame is None:
                raise Nova3DError("--convert-meshes needs --frame (the peer's world frame, e.g. syncdreamer)")
            written = convert_peer_meshes(args.convert_meshes, args.out, args.frame)
            print(f"wrote {len(written)} meshes in nova3d's frame to {args.out} (from frame {args.frame})")
            return 0
        if args.gso is None:
            raise Nova3DError("--gso is required (or --convert-meshes)")
        summary = prepare_gso(args.gso, args.out, args.protocol, limit=args.limit, objects=args.objects,
                              samples=args.samples, resolution=args.resolution, device=args.device,
                              obj_up=args.obj_up, turns=args.gt_turns)
    except Nova3DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.describe())
    for record in summary.failed:
        print(f"  failed: {record['object']}: {record['reason']}")
    if summary.failed:
        print(f"{len(summary.failed)} failure(s) listed in {Path(args.out) / FAILURES_FILE}")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
