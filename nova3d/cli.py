"""The `nova3d` console command. Each subcommand imports its heavy modules only when run."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Sequence

from nova3d.errors import Nova3DError


def _config(args: argparse.Namespace) -> int:
    from nova3d.config import load_experiment, to_yaml

    print(to_yaml(load_experiment(args.experiment, args.overrides)), end="")
    return 0


def _inspect_shards(args: argparse.Namespace) -> int:
    from nova3d.data.inspect import inspect_shards

    report = inspect_shards(args.path)
    print(report.render())
    return 0 if report.ok else 1


def _contact_sheet(args: argparse.Namespace) -> int:
    from nova3d.viz import contact_sheet_from_shards

    path = contact_sheet_from_shards(args.shards, args.out, index=args.index)
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from nova3d.train import main as train_main

    return train_main([args.experiment, *args.overrides])


def _generate(args: argparse.Namespace) -> int:
    from nova3d.atomic import check_writable
    from nova3d.generate import GenerateSettings, generate_object

    check_writable(args.out)  # before the weights load, not after sampling
    settings = GenerateSettings(steps=args.steps, seed=args.seed, guidance=tuple(args.guidance),
                                schedule=args.schedule, device=args.device, dtype=args.dtype,
                                decode_chunk_size=args.decode_chunk_size)
    folder = generate_object(args.image, args.model, args.out, settings)
    print(f"wrote {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from nova3d.export import export_checkpoint

    import torch

    result = export_checkpoint(args.source, args.out, ema=args.ema, which=args.checkpoint, overwrite=args.overwrite,
                               unet_dtype=None if args.unet_dtype is None else getattr(torch, args.unet_dtype))
    weights = "EMA" if result.ema else "raw"
    print(f"wrote {result.out} ({weights} weights of {result.checkpoint}, step {result.global_step})")
    return 0


def _perturb(args: argparse.Namespace) -> int:
    from nova3d.fusion.perturb import PerturbConfig, perturb_object

    cfg = PerturbConfig(pose_rotation_deg=args.rotation, pose_translation=args.translation, seed=args.seed,
                        pose_magnitude=args.magnitude)
    if args.color_views is not None:
        cfg.color_views = args.color_views
    if args.kinds:
        cfg.kinds = args.kinds
    record = perturb_object(args.views, args.out, cfg, overwrite=args.overwrite)
    corrupted = {v: k for v, k in enumerate(record.view_kinds) if k}
    print(f"wrote {args.out}: colours {corrupted or 'untouched'}; poses up to "
          f"{max(record.rotation_deg):.2f} deg / {max(record.translation):.4f} (record in perturb/perturb.json)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from nova3d.atomic import MARKER, check_writable
    from nova3d.devices import resolve_device
    from nova3d.eval.protocol import evaluate_set, get_protocol
    from nova3d.eval.protocols import describe_protocols

    if args.list_protocols:
        print(describe_protocols())
        return 0
    consistency = _consistency_settings(args)  # a bad experiment or key fails here, before any work
    if consistency is not None and args.pred is None and args.gt is None:
        return _eval_consistency_only(args, consistency)
    missing = [f"--{name}" for name in ("pred", "gt", "out") if getattr(args, name) is None]
    if consistency is not None and args.views is None:
        missing.append("--views (the object folders --consistency scores, VIEWS/<id>/)")
    if missing:
        raise Nova3DError(f"{', '.join(missing)} required (or --list-protocols)")
    overrides = {k: v for k, v in (("icp", args.icp or None), ("normalization", args.normalization),
                                   ("chamfer_depth", args.chamfer_depth or None), ("pred_frame", args.pred_frame),
                                   ("appearance", args.appearance)) if v is not None}
    protocol = get_protocol(args.protocol, **overrides)
    check_writable(args.out)  # before any scoring
    had_result = (Path(args.out) / MARKER).is_file()
    device = resolve_device(args.device)
    if consistency is None:
        summary = evaluate_set(args.pred, args.gt, protocol, args.out, progress=True, device=device,
                               views_dir=args.views, requested_as=args.protocol)
    else:  # the files are written once the consistency column is in
        from nova3d.atomic import check_replaceable
        from nova3d.eval.consistency_eval import add_consistency, write_if_useful

        check_replaceable(args.out)
        summary = evaluate_set(args.pred, args.gt, protocol, None, progress=True, device=device,
                               views_dir=args.views, requested_as=args.protocol)
        write_if_useful(add_consistency(summary, args.views, consistency), args.out)
    failed = ", ".join(f"{o.object_id} ({o.status})" for o in summary.not_evaluated)
    return _eval_outcome(summary, args.out, had_result, f"no object could be evaluated: {failed}")


def _eval_outcome(summary, out: str, had_result: bool, why_none: str) -> int:
    """Print an eval summary; exit status 1 (and why, and what became of OUT) when nothing was scored."""
    print(summary.markdown(), end="")
    if not summary.evaluated:
        kept = (f"the earlier result in {out} is kept as it was" if had_result
                else f"the reasons are in {out}/per_object.csv")
        print(f"nova3d eval: error: {why_none}; {kept}", file=sys.stderr)
        return 1
    print(f"wrote {out}/per_object.csv, summary.json, summary.md")
    return 0


def _consistency_settings(args: argparse.Namespace):
    """ConsistencySettings from the --consistency options (None without --consistency), checked by
    loading its fusion config once."""
    if not args.consistency:
        return None
    from nova3d.eval.consistency import CONSISTENCY_FUSION, ConsistencySettings, load_settings_config

    settings = ConsistencySettings(experiment=args.consistency_experiment,
                                   overrides=(*CONSISTENCY_FUSION, f"device={args.device}",
                                              *(args.consistency_set or ())),
                                   image_size=args.consistency_size)
    load_settings_config(settings)
    return settings


def _eval_consistency_only(args: argparse.Namespace, settings) -> int:
    from nova3d.atomic import MARKER
    from nova3d.eval.consistency_eval import consistency_only

    missing = [f"--{name}" for name in ("views", "out") if getattr(args, name) is None]
    if missing:
        raise Nova3DError(f"{', '.join(missing)} required with --consistency and no ground truth")
    had_result = (Path(args.out) / MARKER).is_file()
    summary = consistency_only(args.views, args.out, settings)
    failed = "; ".join(o.reason or o.object_id for o in summary.not_evaluated)
    return _eval_outcome(summary, args.out, had_result, f"no object folder could be scored: {failed}")


def _report(args: argparse.Namespace) -> int:
    from nova3d.eval.report import DEFAULT_TAGS, build_report, write_report

    report = build_report(args.runs, baseline=args.baseline, metrics=args.metrics, primary=args.primary,
                          tags=tuple(args.tags or DEFAULT_TAGS))
    print(report.markdown(), end="")
    if args.out:
        md, hparams = write_report(report, args.out)
        print(f"wrote {md}; TensorBoard hparams in {hparams} (tensorboard --logdir {hparams})")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from nova3d.fuse import fuse_object, load_fusion_config

    result = fuse_object(args.views, args.out, load_fusion_config(args.experiment, args.overrides),
                         log=lambda line: print(line, flush=True), from_field=args.from_field)
    m = result.metrics
    print(f"wrote {', '.join(str(p) for p in result.meshes.values())} ({m['faces']} faces) in {m['seconds_total']:.0f} s; "
          f"pictures, metrics.json and TensorBoard logs in {result.out_dir}")
    return 0


def _image_to_3d(args: argparse.Namespace) -> int:
    from nova3d.generate import GenerateSettings
    from nova3d.image_to_3d import image_to_3d, load_config, summary

    settings = GenerateSettings(steps=args.steps, seed=args.seed, guidance=tuple(args.guidance),
                                schedule=args.schedule, device=args.device)
    cfg = load_config(args.fusion_experiment, args.overrides, device=args.device)
    print(summary(image_to_3d(args.image, args.model, args.out, settings, cfg, log=lambda s: print(s, flush=True))))
    return 0


def _add_image_and_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="input image: an RGBA PNG (or RGB on a uniform background)")
    p.add_argument("--model", required=True, help="a folder written by Nova3DPipeline.save_pretrained")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampler settings `generate` and `image-to-3d` share (nova3d.generate.GenerateSettings)."""
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN", "MAX"),
                   help="classifier-free guidance scale range over the views")
    p.add_argument("--schedule", default="triangle", choices=["triangle", "linear", "constant"],
                   help="guidance over the views: triangle (min at the input view), linear, constant")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova3d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=run)
        return p

    p = add("config", "print an experiment's fully resolved config", _config)
    p.add_argument("experiment", help="name under experiments/ (e.g. tiny, ablations/no_gta) or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")

    p = add("train", "train the multi-view diffusion model (same as python -m nova3d.train)", _train)
    p.add_argument("experiment", help="name under experiments/ (e.g. tiny, gta_full) or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=10")

    p = add("inspect-shards", "count samples, keys and shapes in WebDataset shards; exit 1 if broken",
            _inspect_shards)
    p.add_argument("path", help="a shard directory, a .tar file, or a brace pattern")

    p = add("contact-sheet", "write a PNG of one sample: input, RGB views, normal views", _contact_sheet)
    p.add_argument("shards", help="a shard directory, a .tar file, or a brace pattern")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--index", type=int, default=0, help="which sample (in shard order)")

    p = add("generate", "generate RGB + normal orbit views of one image into an object folder", _generate)
    _add_image_and_model_args(p)
    p.add_argument("--out", required=True, help="parent folder: the views go to OUT/<image name>/")
    _add_sampling_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32, float16 (GPU) or bfloat16: UNet and CLIP precision; "
                   "a float16 SVD VAE encodes in float32 as SVD's pipeline does")
    p.add_argument("--decode-chunk-size", type=int, default=None, metavar="N",
                   help="frames per VAE decode call, per video (default: the whole orbit); lower it to save memory")

    p = add("fuse", "de-conflict fusion: an object folder of views -> textured mesh, turntable, conflict maps", _fuse)
    p.add_argument("--views", required=True, help="object folder (rendered by data_prep, generated, or perturbed)")
    p.add_argument("--out", required=True, help="output folder (mesh.glb/.obj/.ply, pictures, metrics.json)")
    p.add_argument("--experiment", default="fusion/default",
                   help="fusion experiment: fusion/default, fusion/no_conflict, fusion/no_pose_refine, ...")
    p.add_argument("--from-field", metavar="FIELD_PT", help="no fit: export the field.pt an earlier fit saved "
                   "(export.save_field=true) with these export.* settings; give the fit's experiment and overrides")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.steps=300 export.uv_texture=true")

    p = add("image-to-3d", "one image -> generated views -> fused textured mesh (generate + fuse in one command)",
            _image_to_3d)
    _add_image_and_model_args(p)
    p.add_argument("--out", required=True, help="output folder: views/<image name>/, mesh.glb/.obj/.ply, pictures")
    _add_sampling_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (generation and fusion)")
    p.add_argument("--fusion-experiment", default="fusion/default",
                   help="fusion experiment: fusion/default, fusion/no_conflict, fusion/no_pose_refine, ...")
    p.add_argument("overrides", nargs="*", help="fusion key=value overrides, e.g. optim.steps=300")

    p = add("export", "training checkpoint or run dir -> a pipeline folder for `nova3d generate --model`", _export)
    p.add_argument("source", metavar="RUN_OR_CKPT", help="a .ckpt file, or a run directory (its checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="pipeline folder to write (Nova3DPipeline.save_pretrained)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export the EMA weights (default: when the checkpoint has them)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="which checkpoint of a run directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--unet-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="store the UNet weights in this dtype (float16 halves the folder; default: as trained)")

    p = add("perturb", "copy an object folder with simulated generation errors (colour corruption, pose errors)",
            _perturb)
    p.add_argument("--views", required=True, help="the object folder to copy")
    p.add_argument("--out", required=True, help="the new object folder (gets perturb/ with masks and true cameras)")
    p.add_argument("--color-views", type=int, nargs="*", default=None, metavar="V",
                   help="views whose colours are corrupted (default 3 6 10 13; none: no colour corruption)")
    p.add_argument("--kinds", nargs="+", choices=["drift", "blotch", "blur"], default=None,
                   help="corruption kinds, cycled over the colour views (default: all three)")
    p.add_argument("--rotation", type=float, default=0.0, metavar="DEG",
                   help="largest camera rotation of views other than the input view, degrees")
    p.add_argument("--translation", type=float, default=0.0, metavar="FRAC",
                   help="largest camera shift, fraction of the camera radius")
    p.add_argument("--magnitude", choices=["uniform", "max"], default="uniform",
                   help="per-view pose error size: uniform in [0, max], or exactly the max")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add("eval", "score predicted meshes against ground truth under a named protocol; writes CSV, JSON, markdown",
            _eval)
    p.add_argument("--pred", help="PRED/<id>.{glb,obj,ply} or PRED/<id>/mesh.{glb,obj,ply}")
    p.add_argument("--gt", help="ground truth made by python -m data_prep.gso --protocol NAME")
    p.add_argument("--protocol", default="nova3d",
                   help="nova3d (default; alias gso), syncdreamer, eschernet, aligned: see --list-protocols")
    p.add_argument("--list-protocols", action="store_true", help="print the protocols and the peer code each follows")
    p.add_argument("--out", help="folder for per_object.csv, summary.json, summary.md")
    p.add_argument("--views", help="generated views VIEWS/<id>/ (protocols scoring generated views, e.g. syncdreamer; "
                   "--consistency), or one object folder (--consistency without ground truth)")
    p.add_argument("--pred-frame", choices=["nova3d", "syncdreamer"], default=None,
                   help="world frame the predicted meshes are stored in (syncdreamer: input camera on +X)")
    p.add_argument("--appearance", choices=["mesh_renders", "generated_views"], default=None,
                   help="PSNR/SSIM/LPIPS on re-renders of the meshes or on the generated views (default: the protocol's)")
    p.add_argument("--icp", action="store_true", help="rigid ICP of the prediction onto the GT after normalising")
    p.add_argument("--normalization", choices=["gt_only", "unit_box", "keep", "input_view"], default=None,
                   help="how meshes are put in one frame (default: the protocol's; keep for nova3d)")
    p.add_argument("--chamfer-depth", action="store_true", help="also the depth-render Chamfer as a second column")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--consistency", action="store_true",
                   help="also score the views' multi-view consistency without ground truth (fuse the even views, "
                        "render at the odd ones, and the reverse): VIEWS/<id>/ of --views; with --views and --out "
                        "alone, only that score, for any object folder or folder of them")
    p.add_argument("--consistency-experiment", default="fusion/no_conflict", metavar="NAME",
                   help="fusion experiment the halves are fitted with (default fusion/no_conflict)")
    p.add_argument("--consistency-set", nargs="+", metavar="KEY=VALUE",
                   help="fusion overrides added to the consistency budget "
                        "(nova3d.eval.consistency.CONSISTENCY_FUSION), e.g. optim.steps=300")
    p.add_argument("--consistency-size", type=int, default=64, metavar="PX",
                   help="score the held-out views at this size (default 64; at most the views' own)")

    p = add("report", "compare runs: markdown ablation table + TensorBoard hparams", _report)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training or fusion run directories")
    p.add_argument("--out", help="markdown file to write; TensorBoard hparams go to its folder's hparams/")
    p.add_argument("--baseline", help="run (experiment name, label or path) the deltas are taken against")
    p.add_argument("--metrics", nargs="+", metavar="GLOB", help="columns to show (e.g. 'eval/*' 'val/loss')")
    p.add_argument("--primary", help="metric of the 'Δ vs baseline' column")
    p.add_argument("--tags", nargs="+", metavar="GLOB", help="TensorBoard scalar tags to read "
                   "(default: val/* test/* loss/total pose/*)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from nova3d.hub_noise import quiet_hub_libraries
    from nova3d.signals import exit_code, interrupts_as_errors

    args = _build_parser().parse_args(argv)
    # `train` is python -m nova3d.train, whose SIGTERM/SIGUSR1 handling belongs to SLURM requeueing
    signals = contextlib.nullcontext() if args.command == "train" else interrupts_as_errors()
    try:
        with signals, quiet_hub_libraries():
            return args.run(args)
    except Nova3DError as err:
        print(f"nova3d {args.command}: error: {err}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
