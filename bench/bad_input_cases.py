"""bench/bad_inputs.py's catalogue: each Case makes one bad input (or one failure) in a scratch
folder and returns the command to run against it; the fixtures are the good things the bad inputs
are set beside (a Blender render of a toy object, a good fused result, a good evaluation, shards, a
copy of pretrained/toy), built once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
NOVA3D = [PY, "-m", "nova3d.cli"]
OBJECT = "toy-s0-00000"
QUICK_FUSION = ["optim.steps=20", "optim.rays=256", "optim.fit_resolution=32", "export.resolution=32",
                "logging.tensorboard=false", "logging.progress=false", "logging.turntable_frames=2",
                "logging.preview_every_n_steps=0"]
FIXTURES_RECORD = "fixtures.json"  # in the fixtures folder: what build_fixtures made, for a --keep rerun
DIVERGE = ["optim.steps=5", "optim.lr_grid=1e12", "optim.lr_net=1e12", "optim.lr_color=1e12", "optim.warmup_steps=0"]


@dataclass
class Case:
    name: str
    kind: str  # data loss | silent corruption | traceback | rerun | argument
    make: Callable[[Path], list[str]]  # scratch folder -> argv (after setting up the bad input)
    expect: str  # a word the output must contain (case-insensitive)
    protect: Callable[[Path], list[Path]] = lambda w: []  # what must be byte-identical after
    kill_after: float | None = None  # seconds: SIGKILL the command (a killed run must lose nothing)
    signal_on: tuple[int, str] | None = None  # (signal, text): sent 3 s after stdout says text; exit 128 + signal
    valid: bool = False  # valid (or borderline) input: must exit 0 and say `expect`
    one_line: bool = True  # the command reports a problem as one error line (False: a report or a kill)
    quick: bool = True  # part of --quick
    checks: dict = field(default_factory=dict)


# ---------------------------------------------------------------- fixtures

def build_fixtures(root: Path) -> dict[str, Path]:
    """The good things bad inputs are set beside: built once, in process (a --keep folder that
    holds them from an earlier run is reused: FIXTURES_RECORD lists them)."""
    record = root / FIXTURES_RECORD
    if record.is_file():
        fx = {name: Path(path) for name, path in json.loads(record.read_text()).items()}
        if all(path.exists() for path in fx.values()):
            return fx
    sys.path.insert(0, str(REPO))
    from data_prep.toy_data import GT_MAX_OUTSIDE
    from data_prep.write_shards import write_shards
    from nova3d.demo import render_ground_truth
    from nova3d.eval.protocol import evaluate_set, get_protocol
    from nova3d.fuse import fuse_object, load_fusion_config

    fx = {"gt_root": root / "gt"}
    fx["views"] = render_ground_truth(OBJECT, fx["gt_root"], resolution=64, progress=False, max_outside=GT_MAX_OUTSIDE)
    fx["fused"] = root / "fused"
    fuse_object(fx["views"], fx["fused"], load_fusion_config("fusion/default", QUICK_FUSION))
    fx["pred"] = root / "pred"
    fx["pred"].mkdir()
    shutil.copy(fx["fused"] / "mesh.glb", fx["pred"] / f"{OBJECT}.glb")
    fx["eval"] = root / "eval"
    evaluate_set(fx["pred"], fx["gt_root"], get_protocol("gso", image_size=64, lpips=False), fx["eval"], progress=False)
    fx["shards"] = root / "shards"
    write_shards(fx["gt_root"], fx["shards"], progress=False)
    fx["model"] = root / "model"
    shutil.copytree(REPO / "pretrained" / "toy", fx["model"])
    record.write_text(json.dumps({name: str(path) for name, path in fx.items()}))
    return fx


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def edit_cameras(views: Path, edit: Callable[[dict], object]) -> None:
    path = views / "cameras.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def flip_byte(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def write_mesh_with(path: Path, bad: float) -> Path:
    import numpy as np
    import trimesh

    box = trimesh.creation.box()
    vertices = np.array(box.vertices)
    vertices[0, 0] = bad
    trimesh.Trimesh(vertices, box.faces, process=False).export(path)
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def overwrite_bytes(path: Path, at_fraction: float = 0.7, length: int = 64) -> None:
    """0xFF over a stretch of tensor data: NaNs in float16/32, the safetensors header still valid."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at_fraction)
    data[start:start + length] = b"\xff" * length
    path.write_bytes(bytes(data))


def grey16_png(path: Path) -> Path:
    """A 16-bit greyscale PNG of a grey box on white (no alpha)."""
    import numpy as np
    import PIL.Image

    pixels = np.full((128, 128), 65535, np.uint16)
    pixels[32:96, 40:88] = 20000
    PIL.Image.fromarray(pixels).save(path)
    return path


# ---------------------------------------------------------------- the catalogue

def catalogue(fx: dict[str, Path]) -> list[Case]:
    v, fused, ev, shards, model = fx["views"], fx["fused"], fx["eval"], fx["shards"], fx["model"]
    image = v / "rgb" / "000.png"

    def views_with(edit):
        def make(w: Path) -> Path:
            bad = copy(v, w / OBJECT)
            edit_cameras(bad, edit)
            return bad
        return make

    def truncated_model(w: Path) -> Path:
        bad = copy(model, w / "model")
        weights = next((bad / "unet").glob("*.safetensors"))
        os.truncate(weights, weights.stat().st_size // 3)
        return bad

    def shards_without_manifest(w: Path) -> Path:
        bad = copy(shards, w / "shards")
        (bad / "manifest.json").unlink()
        return bad

    def shards_flipped(w: Path) -> Path:
        bad = copy(shards, w / "shards")
        flip_byte(next(bad.glob("*.tar")), 0.6)
        return bad

    def c2w_3x4(cams):
        cams["frames"][1]["c2w"] = cams["frames"][1]["c2w"][:3]
        return cams

    def render_dir_all_rejected(w: Path) -> Path:
        renders = w / "renders"
        views_with(lambda c: [])(renders)
        return renders

    def checkpoint_cut(w: Path) -> Path:
        path = w / "last.ckpt"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"x" * 4096)
        os.truncate(path, 1000)
        return path

    def truncated_resume(w: Path) -> list[str]:
        ckpt = w / "runs" / "tiny" / "local" / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        shutil.copy(checkpoint_cut(w), ckpt)
        return [PY, "-m", "nova3d.train", "tiny", f"logging.root={w / 'runs'}", f"data.train_shards={shards}",
                "trainer.max_steps=1"]

    def model_with(edit):
        def make(w: Path) -> Path:
            bad = copy(model, w / "model")
            edit(bad)
            return bad
        return make

    unet_weights = lambda m: next((m / "unet").glob("*.safetensors"))  # noqa: E731
    nan_model = model_with(lambda m: overwrite_bytes(unet_weights(m)))
    generate = lambda w, *args, m=model: [*NOVA3D, "generate", "--image", str(image), "--model", str(m),  # noqa: E731
                                          "--out", str(w / "g"), "--steps", "2", *args]
    to_3d = lambda w, *args, m=model: [*NOVA3D, "image-to-3d", "--image", str(image), "--model", str(m),  # noqa: E731
                                       "--out", str(w / "o"), "--steps", "2", *args]
    inside_a_file = lambda w: str(((w / "f").write_text("x") and w / "f") / "out")  # noqa: E731
    fused_copy = lambda w: copy(fused, w / "result")  # noqa: E731
    eval_copy = lambda w: copy(ev, w / "eval")  # noqa: E731
    return [
        # data loss: a failed command must leave an earlier result exactly as it was
        Case("fuse_diverges_over_a_good_result", "data loss",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(fused_copy(w)), *QUICK_FUSION, *DIVERGE],
             "non-finite", lambda w: [w / "result"], quick=False),
        Case("fuse_killed_over_a_good_result", "data loss",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(fused_copy(w))],
             "", lambda w: [w / "result"], kill_after=12, one_line=False, quick=False),
        Case("eval_empty_pred_over_a_good_result", "data loss",
             lambda w: [*NOVA3D, "eval", "--pred", str((w / "empty").mkdir() or w / "empty"), "--gt", str(fx["gt_root"]),
                        "--out", str(eval_copy(w)), "--device", "cpu"], "no object could be evaluated",
             lambda w: [w / "eval"], quick=False),
        Case("fuse_out_holds_someone_elses_files", "data loss",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out",
                        str(((w / "mine").mkdir() or (w / "mine" / "notes.txt").write_text("mine")) and w / "mine"),
                        *QUICK_FUSION], "did not write", lambda w: [w / "mine"]),
        Case("generate_into_an_existing_folder", "data loss",
             lambda w: [*NOVA3D, "generate", "--image", str(image), "--model", str(model), "--out",
                        str(copy(v, w / "gen" / "000").parent), "--steps", "2"], "already exists",
             lambda w: [w / "gen"]),
        Case("export_over_an_existing_folder", "data loss",
             lambda w: [*NOVA3D, "export", str(checkpoint_cut(w)), "--out", str(copy(model, w / "pipe"))],
             "already exists", lambda w: [w / "pipe"]),
        Case("perturb_over_an_existing_folder", "data loss",
             lambda w: [*NOVA3D, "perturb", "--views", str(v), "--out", str(copy(v, w / "p"))], "already exists",
             lambda w: [w / "p"]),
        # silent corruption: found where it is read
        Case("inspect_interrupted_shards", "silent corruption",
             lambda w: [*NOVA3D, "inspect-shards", str(shards_without_manifest(w))], "manifest",
             lambda w: [w / "shards"], one_line=False),
        Case("train_on_interrupted_shards", "silent corruption",
             lambda w: [PY, "-m", "nova3d.train", "tiny", f"logging.root={w / 'runs'}",
                        f"data.train_shards={shards_without_manifest(w)}", "trainer.max_steps=1"], "manifest",
             lambda w: [w / "shards"], quick=False),
        Case("inspect_flipped_byte_in_a_shard", "silent corruption",
             lambda w: [*NOVA3D, "inspect-shards", str(shards_flipped(w))], "checksum", lambda w: [w / "shards"],
             one_line=False),
        Case("render_nan_vertex_obj", "silent corruption",
             lambda w: [PY, "-m", "data_prep.render_views", str(write_mesh_with(w / "nan.obj", float("nan"))),
                        "--out", str(w / "r"), "--resolution", "32", "--samples", "1"], "non-finite"),
        Case("render_inf_vertex_glb", "silent corruption",
             lambda w: [PY, "-m", "data_prep.render_views", str(write_mesh_with(w / "inf.glb", float("inf"))),
                        "--out", str(w / "r"), "--resolution", "32", "--samples", "1"], "non-finite"),
        Case("write_shards_every_object_rejected", "silent corruption",
             lambda w: [PY, "-m", "data_prep.write_shards", str(render_dir_all_rejected(w)), "--out", str(w / "s"),
                        "--no-progress"], "rejected"),
        # a traceback where one line belongs
        Case("fuse_cameras_json_is_a_list", "traceback",
             lambda w: [*NOVA3D, "fuse", "--views", str(views_with(lambda c: [])(w)), "--out", str(w / "o")],
             "cameras.json"),
        Case("fuse_cameras_json_is_a_number_list", "traceback",
             lambda w: [*NOVA3D, "fuse", "--views", str(views_with(lambda c: [1, 2, 3])(w)), "--out", str(w / "o")],
             "cameras.json"),
        Case("fuse_c2w_is_3x4", "traceback",
             lambda w: [*NOVA3D, "fuse", "--views", str(views_with(c2w_3x4)(w)), "--out", str(w / "o"),
                        *QUICK_FUSION], "c2w"),
        Case("generate_truncated_unet_weights", "traceback",
             lambda w: [*NOVA3D, "generate", "--image", str(image), "--model", str(truncated_model(w)),
                        "--out", str(w / "g"), "--steps", "2"], "truncated"),
        Case("image_to_3d_truncated_unet_weights", "traceback",
             lambda w: [*NOVA3D, "image-to-3d", "--image", str(image), "--model", str(truncated_model(w)),
                        "--out", str(w / "g"), "--steps", "2"], "truncated"),
        Case("train_resumes_from_a_truncated_last_ckpt", "traceback", truncated_resume, "not a complete checkpoint",
             lambda w: [w / "runs" / "tiny" / "local"], quick=False),
        Case("export_a_file_that_is_not_a_checkpoint", "traceback",
             lambda w: [*NOVA3D, "export", str((w / "x.ckpt").write_text("hello") and w / "x.ckpt"),
                        "--out", str(w / "pipe")], "checkpoint"),
        Case("write_shards_out_is_a_file", "traceback",
             lambda w: [PY, "-m", "data_prep.write_shards", str(fx["gt_root"]), "--out",
                        str((w / "f").write_text("x") and w / "f")], "is a file", lambda w: [w / "f"]),
        Case("write_shards_cameras_json_is_a_list", "traceback",
             lambda w: [PY, "-m", "data_prep.write_shards", str(render_dir_all_rejected(w)), "--out", str(w / "s"),
                        "--no-progress"], "cameras.json"),
        # a rerun of a finished step does nothing and succeeds (make demo twice)
        Case("write_shards_rerun_is_up_to_date", "rerun",
             lambda w: [PY, "-m", "data_prep.write_shards", str(fx["gt_root"]), "--out", str(copy(shards, w / "s")),
                        "--no-progress"], "up to date", lambda w: [w / "s"], valid=True),
        # arguments and missing things
        Case("fuse_views_folder_missing", "argument",
             lambda w: [*NOVA3D, "fuse", "--views", str(w / "nowhere"), "--out", str(w / "o")], "nowhere"),
        Case("fuse_out_is_a_file", "argument",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str((w / "f").write_text("x") and w / "f")],
             "is a file", lambda w: [w / "f"]),
        Case("fuse_unknown_config_key", "argument",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(w / "o"), "optim.nope=1"], "nope"),
        Case("generate_image_is_not_an_image", "argument",
             lambda w: [*NOVA3D, "generate", "--image", str((w / "i.png").write_text("no") and w / "i.png"),
                        "--model", str(model), "--out", str(w / "g")], "i.png"),
        Case("generate_model_folder_missing", "argument",
             lambda w: [*NOVA3D, "generate", "--image", str(image), "--model", str(w / "nomodel"), "--out", str(w / "g")],
             "nomodel"),
        Case("eval_unknown_protocol", "argument",
             lambda w: [*NOVA3D, "eval", "--pred", str(fx["pred"]), "--gt", str(fx["gt_root"]), "--out", str(w / "e"),
                        "--protocol", "nope"], "unknown protocol"),
        Case("eval_gt_folder_missing", "argument",
             lambda w: [*NOVA3D, "eval", "--pred", str(fx["pred"]), "--gt", str(w / "nogt"), "--out", str(w / "e")],
             "nogt"),
        Case("perturb_color_view_out_of_range", "argument",
             lambda w: [*NOVA3D, "perturb", "--views", str(v), "--out", str(w / "p"), "--color-views", "99"],
             "out of range"),
        Case("contact_sheet_index_out_of_range", "argument",
             lambda w: [*NOVA3D, "contact-sheet", str(shards), "--out", str(w / "c.png"), "--index", "99"], "99"),
        Case("report_out_is_a_folder", "argument",
             lambda w: [*NOVA3D, "report", str(fused), "--out", str((w / "d").mkdir() or w / "d")], "is a folder"),
        Case("config_unknown_experiment", "argument", lambda w: [*NOVA3D, "config", "nope"], "nope"),
        Case("train_unknown_override", "argument",
             lambda w: [PY, "-m", "nova3d.train", "tiny", "trainer.nope=1", f"logging.root={w / 'runs'}"], "nope"),
        # issue 25, class 1: a folder that exists is never half-replaced
        Case("fuse_bad_device_over_a_good_result", "data loss",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(fused_copy(w)), "device=cuda:7"], "device",
             lambda w: [w / "result"]),
        Case("export_over_a_file", "data loss",
             lambda w: [*NOVA3D, "export", str(checkpoint_cut(w)), "--out", str((w / "f").write_text("x") and w / "f")],
             "file", lambda w: [w / "f"]),
        # issue 25, class 2: weights checked when they load, the file and the fault named
        Case("generate_nan_unet_weights", "weights", lambda w: generate(w, m=nan_model(w)), "non-finite"),
        Case("image_to_3d_nan_unet_weights", "weights", lambda w: to_3d(w, m=nan_model(w)), "non-finite"),
        Case("generate_zero_byte_unet_weights", "weights",
             lambda w: generate(w, m=model_with(lambda m: unet_weights(m).write_bytes(b""))(w)), "empty file"),
        Case("generate_model_index_wrong_class", "weights",
             lambda w: generate(w, m=model_with(lambda m: edit_json(m / "model_index.json",
                                                                      _class_name="StableVideoDiffusionPipeline"))(w)),
             "StableVideoDiffusionPipeline"),
        Case("generate_resolution_not_a_number", "weights",
             lambda w: generate(w, m=model_with(lambda m: edit_json(m / "model_index.json", resolution="sixty"))(w)),
             "resolution"),
        Case("generate_unet_config_shapes_mismatch", "weights",
             lambda w: generate(w, m=model_with(lambda m: edit_json(
                 m / "unet" / "config.json",
                 block_out_channels=[c * 2 for c in json.loads((m / "unet" / "config.json").read_text())[
                     "block_out_channels"]]))(w)), "does not match"),
        Case("generate_model_is_a_file", "weights",
             lambda w: generate(w, m=unet_weights(model)), "is a file"),
        # issue 25, class 3: numbers refused at start-up, naming the option
        Case("generate_guidance_nan", "numbers", lambda w: generate(w, "--guidance", "nan", "3"), "--guidance"),
        Case("generate_guidance_huge", "numbers", lambda w: generate(w, "--guidance", "1", "1e9"), "--guidance"),
        Case("generate_steps_zero", "numbers", lambda w: generate(w, "--steps", "0"), "--steps"),
        Case("generate_seed_too_big", "numbers", lambda w: generate(w, "--seed", str(2**64)), "--seed"),
        Case("generate_device_meta", "numbers", lambda w: generate(w, "--device", "meta"), "meta"),
        Case("image_to_3d_fusion_steps_zero", "numbers", lambda w: to_3d(w, "optim.steps=0"), "optim.steps"),
        Case("fuse_steps_zero", "numbers",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(w / "o"), "optim.steps=0"], "optim.steps"),
        Case("fuse_learning_rate_inf", "numbers",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(w / "o"), "optim.lr_grid=inf"],
             "optim.lr_grid"),
        Case("fuse_seed_out_of_range", "numbers",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(w / "o"), "seed=4294967296"], "seed"),
        # issue 25, class 4: signals end a command with one line and 128 + signal, nothing moved in
        Case("fuse_sigterm_over_a_good_result", "signals",
             lambda w: [*NOVA3D, "fuse", "--views", str(v), "--out", str(fused_copy(w))], "interrupted by SIGTERM",
             lambda w: [w / "result"], signal_on=(signal.SIGTERM, "fusion:"), quick=False),
        Case("image_to_3d_sigint", "signals", lambda w: to_3d(w, "--steps", "25"), "interrupted by SIGINT",
             signal_on=(signal.SIGINT, "[1/2] generating"), quick=False),
        # issue 25, class 5: an output folder that cannot be written is found first
        Case("generate_out_inside_a_file", "unwritable output",
             lambda w: [*NOVA3D, "generate", "--image", str(image), "--model", str(model), "--out", inside_a_file(w)],
             "a file, not a folder"),
        Case("image_to_3d_out_inside_a_file", "unwritable output",
             lambda w: [*NOVA3D, "image-to-3d", "--image", str(image), "--model", str(model),
                        "--out", inside_a_file(w)],
             "a file, not a folder"),
        Case("eval_out_inside_a_file", "unwritable output",
             lambda w: [*NOVA3D, "eval", "--pred", str(fx["pred"]), "--gt", str(fx["gt_root"]),
                        "--out", inside_a_file(w)],
             "a file, not a folder"),
        Case("export_out_inside_a_file", "unwritable output",
             lambda w: [*NOVA3D, "export", str(checkpoint_cut(w)), "--out", inside_a_file(w)], "a file, not a folder"),
        Case("toy_data_out_is_a_file", "unwritable output",
             lambda w: [PY, "-m", "data_prep.toy_data", "--out", str((w / "f").write_text("x") and w / "f")],
             "is a file", lambda w: [w / "f"]),
        # issue 25, class 7: messages that name the real cause
        Case("toy_data_resolution_zero", "message",
             lambda w: [PY, "-m", "data_prep.toy_data", "--out", str(w / "t"), "--resolution", "0"], "--resolution"),
        Case("train_vae_yaml_that_does_not_exist", "message",
             lambda w: [PY, "-m", "nova3d.train_vae", str(w / "nope.yaml")], "nope.yaml: no such file"),
        Case("export_a_safetensors_file", "message",
             lambda w: [*NOVA3D, "export", str(unet_weights(model)), "--out", str(w / "pipe")], "safetensors"),
        Case("generate_16_bit_greyscale_png", "valid",
             lambda w: [*NOVA3D, "generate", "--image", str(grey16_png(w / "grey16.png")), "--model", str(model),
                        "--out", str(w / "g"), "--steps", "2"], "wrote", valid=True),
    ]
