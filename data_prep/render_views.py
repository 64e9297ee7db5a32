"""Render 16-view orbits (RGBA, mask, normals, optional depth) of meshes with Blender Cycles.

    python -m data_prep.render_views meshes/ chair.glb --out renders/
    python -m data_prep.render_views --procedural --out renders/ --resolution 128

Each object gets a fresh scene: import, move to a unit bounding box (longest side 1) centred
at the origin, cameras from nova3d.cameras.orbit_cameras, a uniform white world light (colours
stay faithful; Standard view transform, no tone mapping), then all views are rendered as the
frames of one animation (markers switch cameras; persistent data keeps the BVH between frames).
Output folders follow nova3d.data.schema and appear atomically; finished objects are skipped,
failed ones are listed in failures.jsonl and the exit status counts them.

This is the only module that imports bpy (Blender as a Python module); it is imported lazily.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.render_io import (ATTEMPTS_FILE, FAILURES_FILE, LOG_FILE, LOGS_DIR, MAX_ATTEMPTS, MESH_SUFFIXES,
                                 ObjectSource, RenderSettings, RenderSummary, append_failure, build_parser,
                                 object_cameras, object_meta, parse_run, previous_attempts, redirect_output,
                                 start_attempt, write_view_files)
from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.errors import Nova3DError

RENDERER = "blender-cycles"
_GEOMETRY = {"MESH", "CURVE", "SURFACE", "META", "FONT"}
_GPU_BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")
_SCRATCH = "_passes"  # EXR passes inside the partial folder, deleted before the rename


class MeshError(Exception):
    """This object cannot be rendered (corrupt, empty, unsupported): a failures.jsonl entry."""


# --- Blender scene -------------------------------------------------------------------------

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


def use_gpu(backend: str) -> bool:
    """Enable every `backend` device in Cycles' preferences; False if there is none."""
    prefs = _blender().context.preferences.addons["cycles"].preferences
    try:
        prefs.compute_device_type = backend
    except TypeError:  # backend not compiled into this Blender
        return False
    prefs.refresh_devices()
    for device in prefs.devices:
        device.use = device.type == backend
    return any(d.type == backend for d in prefs.devices)


def find_gpu_backend() -> str | None:
    """The first Cycles GPU backend with a device, or None (CPU only)."""
    return next((backend for backend in _GPU_BACKENDS if use_gpu(backend)), None)


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
    try:
        result = importers[suffix](filepath=str(path))
    except Exception as err:  # Blender raises RuntimeError with the importer's message
        message = str(err).strip().splitlines()
        raise MeshError(f"import failed: {message[-1] if message else type(err).__name__}") from err
    if "FINISHED" not in result:
        raise MeshError(f"import failed: importer returned {sorted(result)}")


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


def setup_render(cameras: Cameras, settings: RenderSettings, backend: str | None,
                 folder: Path, scratch: Path) -> None:
    """Cycles, light, cameras (one per view, switched by markers) and the pass outputs."""
    bpy = _blender()
    from mathutils import Matrix

    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    # Factory settings reset the preferences, so the devices are enabled again for each object.
    scene.cycles.device = "GPU" if backend is not None and use_gpu(backend) else "CPU"
    cyc = scene.cycles
    cyc.samples, cyc.use_adaptive_sampling, cyc.use_denoising = settings.samples, True, settings.denoise
    if settings.denoise:  # measured: 8 samples + OIDN beat 16 raw samples on both quality and time
        cyc.denoiser, cyc.denoising_input_passes, cyc.denoising_prefilter = \
            "OPENIMAGEDENOISE", "RGB_ALBEDO_NORMAL", "FAST"
    # Only a uniform world lights the object: a few bounces are all that shows.
    cyc.max_bounces, cyc.diffuse_bounces, cyc.glossy_bounces = 4, 2, 2
    cyc.transmission_bounces, cyc.transparent_max_bounces, cyc.volume_bounces = 4, 8, 0
    cyc.caustics_reflective = cyc.caustics_refractive = False
    render = scene.render
    render.resolution_x = render.resolution_y = settings.resolution
    render.resolution_percentage = 100
    render.film_transparent = True
    render.use_persistent_data = True  # keep BVH and textures between the views
    render.image_settings.file_format, render.image_settings.color_mode = "PNG", "RGBA"
    render.image_settings.color_depth, render.image_settings.compression = "8", 15
    render.filepath = str(folder / schema.RGB_DIR / "###")  # frame k -> rgb/00k.png
    scene.view_settings.view_transform, scene.view_settings.look = "Standard", "None"
    scene.view_settings.exposure, scene.view_settings.gamma = 0.0, 1.0
    scene.display_settings.display_device = "sRGB"

    world = bpy.data.worlds.new("nova3d_white")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (1, 1, 1, 1)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 1.0
    scene.world = world

    for i in range(len(cameras)):
        data = bpy.data.cameras.new(f"view_{i:03d}")
        data.lens_unit, data.sensor_fit = "FOV", "AUTO"
        data.angle = np.radians(cameras.fov_deg)
        data.clip_start, data.clip_end = 0.01, 100.0
        cam = bpy.data.objects.new(f"view_{i:03d}", data)
        scene.collection.objects.link(cam)
        cam.matrix_world = Matrix(cameras.c2w[i].tolist())  # our opengl axes = Blender camera axes
        scene.timeline_markers.new(f"view_{i:03d}", frame=i).camera = cam
    scene.camera = bpy.data.objects["view_000"]
    scene.frame_start, scene.frame_end, scene.frame_current = 0, len(cameras) - 1, 0

    layer = scene.view_layers[0]
    layer.use_pass_normal, layer.use_pass_z = True, settings.depth
    scene.use_nodes = True
    tree = scene.node_tree
    tree.nodes.clear()
    passes = tree.nodes.new("CompositorNodeRLayers")
    composite = tree.nodes.new("CompositorNodeComposite")
    tree.links.new(passes.outputs["Image"], composite.inputs["Image"])
    out = tree.nodes.new("CompositorNodeOutputFile")
    out.base_path = str(scratch)
    out.format.file_format, out.format.color_depth, out.format.exr_codec = "OPEN_EXR", "32", "NONE"
    out.format.color_mode = "RGB"
    out.file_slots[0].path = "normal_###"
    tree.links.new(passes.outputs["Normal"], out.inputs[0])
    if settings.depth:
        out.file_slots.new("depth_###")
        tree.links.new(passes.outputs["Depth"], out.inputs[1])


def _read_exr(path: Path) -> np.ndarray:
    """[H, W, 3] float32 from an EXR written by the compositor (top row first)."""
    bpy = _blender()
    image = bpy.data.images.load(str(path))
    try:
        image.colorspace_settings.name = "Non-Color"  # raw data, no colour conversion
        w, h = image.size
        pixels = np.empty(w * h * 4, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    return pixels.reshape(h, w, 4)[::-1, :, :3]  # Blender images start at the bottom row


def render_object(source: ObjectSource, folder: Path, settings: RenderSettings, backend: str | None) -> None:
    """Render one object into `folder` (which exists and is empty); MeshError if it cannot be."""
    bpy = _blender()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    path = source.path
    if source.procedural is not None:  # through a real file, so the glTF path is what gets tested
        from data_prep.procedural import export_object

        path = export_object(source.procedural, folder / "_source.glb")
    import_mesh(path)
    normalisation = normalise_scene()
    prepare_materials()
    cameras = object_cameras(settings, source.object_id)
    scratch = folder / _SCRATCH
    (folder / schema.RGB_DIR).mkdir()
    setup_render(cameras, settings, backend, folder, scratch)
    bpy.ops.render.render(animation=True)

    views = range(len(cameras))
    normals = np.stack([_read_exr(scratch / f"normal_{i:03d}.exr") for i in views])
    depth = np.stack([_read_exr(scratch / f"depth_{i:03d}.exr")[..., 0] for i in views]) if settings.depth else None
    if not write_view_files(folder, cameras, normals, depth, settings.background).any():
        raise MeshError("nothing visible: every view's mask is empty")
    shutil.rmtree(scratch)
    if source.procedural is not None:
        path.unlink()
    cameras.save(folder / schema.CAMERAS_FILE)
    (folder / ATTEMPTS_FILE).unlink()
    renderer = {"name": RENDERER, "version": bpy.app.version_string, "device": backend or "CPU"}
    object_meta(source, settings, cameras, normalisation, renderer).save(folder / schema.META_FILE)


# --- the run -------------------------------------------------------------------------------

def _pick_backend(device: str) -> str | None:
    if device == "cpu":
        return None
    backend = find_gpu_backend()
    if backend is None and device == "gpu":
        raise Nova3DError("--device gpu: Cycles finds no GPU (tried " + ", ".join(_GPU_BACKENDS) + ")")
    return backend


def _record_failure(summary: RenderSummary, out: Path, source: ObjectSource, reason: str) -> None:
    record = {"object": source.object_id, "source": source.source, "reason": reason}
    append_failure(out, record)
    summary.failed.append(record)


def render_objects(sources: list[ObjectSource], out_dir: str | os.PathLike,
                   settings: RenderSettings = RenderSettings(), progress: bool = True) -> RenderSummary:
    """Render every source into `out_dir/<object id>/` (schema layout); resumable and idempotent."""
    settings.check()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Nova3DError(f"cannot create output folder {out}: {err.strerror or err}") from err
    if settings.limit is not None:
        sources = sources[: settings.limit]
    summary = RenderSummary()
    todo = [s for s in sources if not (out / s.object_id).exists()]
    backend = _pick_backend(settings.device) if todo else None  # no Blender start-up when all are done
    for source in tqdm(sources, desc="render", unit="obj", disable=not progress):
        final = out / source.object_id
        partial = final.with_name(final.name + schema.TMP_SUFFIX)
        if final.exists():
            summary.skipped.append(source.object_id)
            continue
        if previous_attempts(partial) >= MAX_ATTEMPTS:  # kept, so later runs give up on it too
            _record_failure(summary, out, source, f"{MAX_ATTEMPTS} runs died rendering it (Blender crash?); "
                                                  f"delete {partial} to try again")
            continue
        start = time.perf_counter()
        log = partial / LOG_FILE  # Blender's chatter; kept (in logs/) only when the object fails
        try:
            start_attempt(partial)  # clears what an interrupted run left
            with redirect_output(log):
                render_object(source, partial, settings, backend)
        except Exception as err:  # one bad object must not stop a long run
            reason = str(err) if isinstance(err, MeshError) else f"{type(err).__name__}: {err}"
            _record_failure(summary, out, source, reason)
            if log.is_file():
                (out / LOGS_DIR).mkdir(exist_ok=True)
                os.replace(log, out / LOGS_DIR / f"{source.object_id}.log")
            shutil.rmtree(partial, ignore_errors=True)
            continue
        log.unlink()
        os.replace(partial, final)
        summary.rendered.append(source.object_id)
        summary.seconds[source.object_id] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit status = number of failed objects (at most 255), 2 for unusable input."""
    args = build_parser("python -m data_prep.render_views", __doc__.split("\n\n")[0]).parse_args(argv)
    try:
        sources, settings = parse_run(args)
        summary = render_objects(sources, args.out, settings)
    except Nova3DError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.describe())
    if summary.failed:
        print(f"{len(summary.failed)} failure(s) listed in {Path(args.out) / FAILURES_FILE}")
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
