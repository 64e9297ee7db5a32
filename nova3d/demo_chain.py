"""`make demo`'s main section: the whole NOVA3D chain on CPU, from one image of an unseen object.

A test-split object of the toy family (data_prep.toy_family, never seen in training) is rendered
with Blender (16 views at the model's resolution, depth on) with its GT mesh: OUT/gt/<id>/. Its
input view (view 0) goes through the shipped toy pipeline (pretrained/toy, Nova3DPipeline: EDM
sampler, per-frame CFG, GTA domains): 16 RGB + 16 normal views, OUT/generated/<id>/, scored against
the true renders (nova3d.eval.generated_views) beside the input-view-repeated baseline. The
generated views are then fused three times (fusion/default and the no_conflict / no_pose_refine
baselines at the toy budget TOY_FUSION), OUT/fusion/<run>/<id>/, and the true renders once
(fusion/default, OUT/fusion/true_renders/: the ceiling of the generated views). Each mesh is scored
with the GSO protocol (64² views) against the GT mesh. OUT/report.md shows it all; OUT/demo.json has the
numbers. The render is kept between runs; everything after it is redone, staged: a failed run
leaves the previous results as they were.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nova3d.atomic import atomic_path, moved_paths, staged_entries, write_json_atomic
from nova3d.eval import generated_views as gv
from nova3d.eval.results import fmt

REPO = Path(__file__).resolve().parent.parent
TOY_MODEL = REPO / "pretrained" / "toy"
TOY_OBJECT = "toy-s0-00000"  # index 0: test split (data_prep.toy_family.split_of)
TOY_STEPS = 25
RUNS = {"default": "fusion/default", "no_conflict": "fusion/no_conflict", "no_pose_refine": "fusion/no_pose_refine"}
REFERENCE = "true_renders"  # fusion/default on the true renders: what fusion makes of consistent views
GENERATED_SHEET, REPORT, RECORD = "generated_vs_true.png", "report.md", "demo.json"


@dataclass
class ChainRun:
    name: str
    experiment: str
    out_dir: Path
    metrics: dict  # what nova3d fuse wrote
    scores: dict  # the GSO protocol's scalars + status


@dataclass
class ChainResult:
    out: Path
    object_id: str
    gt_folder: Path
    generated: Path
    model: Path
    steps: int
    view_scores: dict  # means over the novel views
    baseline_scores: dict  # input view repeated, scored the same way
    per_view: dict  # psnr / normal error per view
    runs: dict[str, ChainRun]
    fusion_overrides: list[str]
    protocol: dict
    sheet: Path
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def _tile(images: torch.Tensor, label: str, tile: int) -> Image.Image:
    """[V, 3, H, W] in [0, 1] -> one row of V tiles with a label column."""
    from nova3d.viz import to_uint8

    row = Image.new("RGB", (tile * (len(images) + 1), tile), "white")
    ImageDraw.Draw(row).text((3, tile // 2 - 6), label, fill="black")
    for i, im in enumerate(to_uint8(images)):
        row.paste(Image.fromarray(im).resize((tile, tile), Image.NEAREST), ((i + 1) * tile, 0))
    return row


def views_sheet(true: gv.Views, generated: gv.Views, path: Path, tile: int = 64) -> Path:
    """True renders over generated views, RGB then normals ((n+1)/2, input-view frame)."""
    from nova3d.viz import save_png_atomic

    shade = lambda v: ((v.normals + 1) / 2) * (v.masks >= gv.FOREGROUND) + (v.masks < gv.FOREGROUND)  # noqa: E731
    rows = [_tile(true.rgb, "true RGB", tile), _tile(generated.rgb, "generated", tile),
            _tile(shade(true), "true normals", tile), _tile(shade(generated), "generated", tile)]
    sheet = Image.new("RGB", (rows[0].width, tile * len(rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * tile))
    return save_png_atomic(sheet, path)


def run_chain(out: str | Path, model: str | Path = TOY_MODEL, object_name: str = TOY_OBJECT,
              fusion: tuple[str, ...] | None = None, steps: int = TOY_STEPS, seed: int = 0,
              runs: tuple[str, ...] = tuple(RUNS), reference: bool = True, log=lambda message: None) -> ChainResult:
    """The chain of the module docstring; returns what it made (Nova3DError on unusable input).
    reference: also fuse the true renders (fusion/default), the ceiling the generated views are read against."""
    from data_prep.toy_data import GT_MAX_OUTSIDE
    from nova3d.demo_parts import TOY_FUSION, render_ground_truth
    from nova3d.generate import check_model_dir

    out, model = Path(out), Path(model)
    fusion = TOY_FUSION if fusion is None else fusion
    _, index = check_model_dir(model)
    seconds, t = {}, time.perf_counter()
    log(f"render {object_name} with Blender ({index['resolution']}², 16 views, depth) + GT mesh ...")
    gt = render_ground_truth(object_name, out / "gt", resolution=index["resolution"], progress=False,
                             max_outside=GT_MAX_OUTSIDE)
    seconds["render + GT mesh"] = time.perf_counter() - t
    with staged_entries(out, "demo") as stage:  # a failed run keeps the previous generated/, fusion/, report
        chain = _generate_and_fuse(stage, gt, model, index, steps, seed, fusion, runs, reference, log, seconds)
        chain = moved_paths(chain, stage, out)
        chain.report = out / REPORT
        write_report(chain, stage / REPORT, report_dir=out)
        write_json_atomic(stage / RECORD, record(chain))
    return chain


def _generate_and_fuse(out: Path, gt: Path, model: Path, index: dict, steps: int, seed: int, fusion, runs,
                       reference: bool, log, seconds: dict) -> ChainResult:
    from nova3d.data.shards import read_object_folder
    from nova3d.demo_parts import score_mesh
    from nova3d.eval.protocol import get_protocol
    from nova3d.fuse import fuse_object, load_fusion_config
    from nova3d.generate import GenerateSettings, generate_into, load_pipeline

    jobs = {name: RUNS[name] for name in runs} | ({REFERENCE: RUNS["default"]} if reference else {})
    configs = {name: load_fusion_config(exp, list(fusion)) for name, exp in jobs.items()}  # bad keys fail now
    t = time.perf_counter()
    log(f"generate 16 RGB + 16 normal views from its input view with {model} ({steps} steps) ...")
    pipe = load_pipeline(model, torch.device("cpu"))
    true = gv.Views.from_sample(read_object_folder(gt))
    generated = generate_into(pipe, true.rgb[0], out / "generated", gt.name,
                              GenerateSettings(steps=steps, seed=seed, progress=False), model,
                              {"image": str(gt / "rgb" / "000.png")})
    del pipe
    gen = gv.Views.from_sample(read_object_folder(generated))
    scores, baseline = gv.score_views(gen, true), gv.score_views(gv.input_repeated(true), true)
    sheet = views_sheet(true, gen, out / GENERATED_SHEET)
    seconds["generate"] = time.perf_counter() - t
    log(f"  generated views: PSNR {scores.mean('psnr'):.2f} dB (input repeated {baseline.mean('psnr'):.2f}), "
        f"normal error {scores.mean('normal_error_deg'):.1f} deg ({baseline.mean('normal_error_deg'):.1f}), "
        f"RGB-normal mask IoU {scores.mean('mask_iou'):.3f}")

    protocol = get_protocol("nova3d", image_size=int(index["resolution"]), lpips=False)
    results = {}
    for name, experiment in jobs.items():
        t = time.perf_counter()
        views = gt if name == REFERENCE else generated
        log(f"fuse the {'true renders' if name == REFERENCE else 'generated views'}: {name} ({experiment}) ...")
        run_dir = out / "fusion" / name / gt.name
        fused = fuse_object(views, run_dir, configs[name])
        result = score_mesh(fused.meshes["glb"], gt, run_dir / "eval", protocol, (None, "LPIPS off in the demo"))
        results[name] = ChainRun(name, experiment, run_dir, fused.metrics,
                                 {**result.scalars(), "status": result.status, "reason": result.reason})
        seconds[f"fuse+eval {name}"] = time.perf_counter() - t
        s = results[name].scores
        log(f"  {name}: fit {fused.metrics['seconds_fit']:.0f}s, CD {s['chamfer'] or float('nan'):.4f}, "
            f"IoU {s['volume_iou'] or float('nan'):.3f}, PSNR {s['psnr'] or float('nan'):.2f}")
        del fused
    chain = ChainResult(out, gt.name, gt, generated, model, steps, scores.means(), baseline.means(),
                        {"psnr": scores.psnr, "normal_error_deg": scores.normal_error_deg,
                         "baseline_psnr": baseline.psnr}, results, list(fusion), dataclasses.asdict(protocol),
                        sheet, seconds)
    return chain


def record(chain: ChainResult) -> dict:
    """demo.json: every number of the report."""
    return {"object_id": chain.object_id, "model": str(chain.model), "steps": chain.steps,
            "generated_views": chain.view_scores, "baseline_input_repeated": chain.baseline_scores,
            "per_view": chain.per_view, "fusion_overrides": chain.fusion_overrides, "seconds": chain.seconds,
            "runs": {n: {"experiment": r.experiment, "out_dir": str(r.out_dir), "metrics": r.metrics,
                         "scores": r.scores} for n, r in chain.runs.items()}}


def report_markdown(chain: ChainResult, report_dir: Path) -> str:
    link = lambda p: os.path.relpath(p, report_dir)  # noqa: E731
    g, b = chain.view_scores, chain.baseline_scores
    label = lambda r: (f"{r.name} (`{r.experiment}`)" if r.name != REFERENCE  # noqa: E731
                       else f"reference: `{r.experiment}` on the **true** renders")
    rows = [f"| {label(r)} | {fmt(r.scores.get('chamfer'), 4)} | {fmt(r.scores.get('volume_iou'), 3)} | "
            f"{fmt(r.scores.get('psnr'), 2)} | {fmt(r.scores.get('ssim'), 3)} | {r.metrics.get('seconds_fit', 0):.0f} |"
            for r in chain.runs.values()]
    lines = [
        f"# nova3d demo — one image of `{chain.object_id}` to a textured mesh",
        "",
        f"`{chain.object_id}` is a test-split object of the toy family (`data_prep/toy_family.py`): the toy "
        f"model never saw it. Its input view (view 0 of a Blender render) went through the shipped toy pipeline "
        f"(`{link(chain.model)}`, {chain.steps} EDM "
        "steps, per-frame CFG 1→3), which generated 16 RGB and 16 normal views; de-conflict fusion turned them "
        "into a mesh, scored against the object's ground truth.",
        "",
        "## Generated views against the true renders",
        "",
        f"![true and generated views]({link(chain.sheet)})",
        "",
        "| views 1–15 | PSNR (dB) | SSIM | normal error (°) | RGB–normal mask IoU |",
        "|---|---|---|---|---|",
        f"| generated | {fmt(g['psnr'], 2)} | {fmt(g['ssim'], 3)} | {fmt(g['normal_error_deg'], 1)} | "
        f"{fmt(g['mask_iou'], 3)} |",
        f"| input view repeated (baseline) | {fmt(b['psnr'], 2)} | {fmt(b['ssim'], 3)} | "
        f"{fmt(b['normal_error_deg'], 1)} | — |",
        "",
        "Normal error: mean angle on the true foreground, both in the input view's frame; the baseline repeats "
        "the *true* input-view normals, which the model is not given. Mask IoU: the generated RGB's foreground "
        "against the generated normals' foreground (`nova3d/eval/generated_views.py`).",
        "",
        "## Meshes fused from the generated views",
        "",
        "| run | CD | IoU | PSNR | SSIM | fit s |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"GSO protocol (`nova3d/eval/protocol.py`, views at {chain.protocol['image_size']}², LPIPS off); fusion at "
        "the toy budget (`nova3d/demo_parts.py: TOY_FUSION`)."
        + (" The reference row fuses the object's true renders with the same settings: the gap between it and "
           "the rows above is what the toy generator's views cost, not fusion." if REFERENCE in chain.runs else ""),
        "",
        "| " + " | ".join(chain.runs) + " |",
        "|" + "---|" * len(chain.runs),
        "| " + " | ".join(f"![{n} turntable]({link(r.out_dir / 'turntable.gif')})" for n, r in chain.runs.items())
        + " |",
        "",
        "## Files",
        "",
        f"- generated views (an object folder, `nova3d fuse --views` reads it): `{link(chain.generated)}/`",
        f"- ground truth (Blender renders + `mesh.glb`): `{link(chain.gt_folder)}/`",
        *[f"- `{n}`: [mesh.glb]({link(r.out_dir / 'mesh.glb')}), [metrics.json]({link(r.out_dir / 'metrics.json')}), "
          f"[evaluation]({link(r.out_dir / 'eval' / 'summary.md')})" for n, r in chain.runs.items()],
        "- every number above: [demo.json](demo.json)",
        "",
        "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in chain.seconds.items()) + ".",
        "",
        "The same chain on your own image: `nova3d image-to-3d --image IMG --model pretrained/toy --out OUT` "
        "(toy model: objects like the toy family only); with a model trained by `make train EXP=gta_full`, "
        "`nova3d export` it and pass that folder as `--model`.",
        "",
    ]
    return "\n".join(lines)


def write_report(chain: ChainResult, path: Path, report_dir: Path | None = None) -> Path:
    """report.md at `path`, its links relative to `report_dir` (where it will live; default: beside `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(report_markdown(chain, report_dir or path.parent))
    return path
