"""Render 16-view orbits (RGBA, mask, normals, optional depth) of meshes with Blender Cycles.

    python -m data_prep.render_views meshes/ chair.glb --out renders/
    python -m data_prep.render_views --procedural --out renders/ --resolution 128

Each object gets a fresh scene: import, move to a unit bounding box (longest side 1) centred
at the origin, cameras from nova3d.cameras.orbit_cameras, a uniform white world light (colours
stay faithful; Standard view transform, no tone mapping), then all views are rendered as the
frames of one animation (markers switch cameras; persistent data keeps the BVH between frames).
Output folders follow nova3d.data.schema and appear atomically; finished objects are skipped,
failed ones are printed (`failed <id>: <reason>`, on stderr) and listed in failures.jsonl.

Exit status: 0 all objects rendered (or already done); 1 some objects failed, the others were
rendered; 2 unusable input or arguments (one `error:` line on stderr), nothing rendered.

Scene preparation (import, unit box, materials) is in blender_scene.py, which also owns the
lazy bpy import (`_blender`).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.blender_scene import MeshError, _blender, import_mesh, normalise_scene, prepare_materials
from data_prep.render_io import (ATTEMPTS_FILE, FAILURES_FILE, LOG_FILE, LOGS_DIR, MAX_ATTEMPTS, ObjectSource,
                                 RenderSettings, RenderSummary, append_failure, build_parser, object_cameras,
                                 object_meta, parse_run, previous_attempts, redirect_output, stale_reason,
                                 start_attempt, write_view_files)
from nova3d.atomic import check_writable
from nova3d.cameras import Cameras
from nova3d.data import schema
from nova3d.errors import Nova3DError
from nova3d.signals import exit_code, interrupts_as_errors

RENDERER = "blender-cycles"
_GPU_BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")
_SCRATCH = "_passes"  # EXR passes inside the partial folder, deleted before the rename
EXIT_STATUS = ("exit status: 0 all rendered (or already done); 1 some objects failed (listed in "
               f"{FAILURES_FILE}), the others rendered; 2 unusable input or arguments, nothing rendered; "
               "130 / 143 interrupted by SIGINT / SIGTERM (finished objects kept)")


# --- Blender render ------------------------------------------------------------------------

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
    tqdm.write(f"failed {source.object_id}: {' '.join(reason.split())}", file=sys.stderr)  # above the bar


def render_objects(sources: list[ObjectSource], out_dir: str | os.PathLike,
                   settings: RenderSettings = RenderSettings(), progress: bool = True) -> RenderSummary:
    """Render every source into `out_dir/<object id>/` (schema layout); resumable and idempotent."""
    settings.check()
    out = Path(out_dir)
    if settings.limit is not None:
        sources = sources[: settings.limit]
    summary = RenderSummary()
    stale = {s.object_id: why for s in sources if (out / s.object_id).is_dir()
             and (why := stale_reason(out / s.object_id, settings))}
    todo = [s for s in sources if not (out / s.object_id).exists() or s.object_id in stale]
    backend = _pick_backend(settings.device) if todo else None  # no Blender start-up when all are done
    check_writable(out)  # a file, or a folder that cannot be written: before any render
    try:  # after the device check: unusable input leaves no output folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Nova3DError(f"cannot create output folder {out}: {err.strerror or err}") from err
    for source in tqdm(sources, desc="render", unit="obj", disable=not progress):
        final = out / source.object_id
        partial = final.with_name(final.name + schema.TMP_SUFFIX)
        if final.exists() and source.object_id not in stale:
            summary.skipped.append(source.object_id)
            continue
        if source.object_id in stale:  # said on the terminal, not only in a file
            tqdm.write(f"re-rendering {source.object_id}: its render has other settings "
                       f"({stale[source.object_id]})", file=sys.stderr)
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
        if final.exists():  # a stale render: swap, so a kill in between keeps one of the two whole
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
            summary.redone[source.object_id] = stale[source.object_id]
        else:
            os.replace(partial, final)
        summary.rendered.append(source.object_id)
        summary.seconds[source.object_id] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit status 0 all done, 1 some objects failed, 2 unusable input (module docstring)."""
    args = build_parser("python -m data_prep.render_views", __doc__.split("\n\n")[0],
                        EXIT_STATUS).parse_args(argv)
    try:
        with interrupts_as_errors():  # SIGTERM/SIGINT: one line and 128 + signal, like any error
            sources, settings = parse_run(args)
            summary = render_objects(sources, args.out, settings)
    except Nova3DError as err:
        print(f"render_views: error: {err}", file=sys.stderr)
        return exit_code(err)
    print(summary.describe())
    if summary.failed:  # each was printed as it happened; the last line says how many and where
        first = summary.failed[0]
        print(f"render_views: error: {len(summary.failed)} of {len(sources)} object(s) failed (first: "
              f"{first['object']}: {' '.join(first['reason'].split())[:300]}); all listed in "
              f"{Path(args.out) / FAILURES_FILE}", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
