"""The `nova3d` console command. Each subcommand imports its heavy modules only when run."""
from __future__ import annotations

import argparse
import sys
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
    from nova3d.generate import GenerateSettings, generate_object

    settings = GenerateSettings(steps=args.steps, seed=args.seed, guidance=tuple(args.guidance),
                                schedule=args.schedule, device=args.device)
    folder = generate_object(args.image, args.model, args.out, settings)
    print(f"wrote {folder}")
    return 0


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
    p.add_argument("--image", required=True, help="input image: an RGBA PNG (or RGB on a uniform background)")
    p.add_argument("--model", required=True, help="a folder written by Nova3DPipeline.save_pretrained")
    p.add_argument("--out", required=True, help="parent folder: the views go to OUT/<image name>/")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, nargs=2, default=[1.0, 3.0], metavar=("MIN", "MAX"),
                   help="classifier-free guidance scale range over the views")
    p.add_argument("--schedule", default="triangle", choices=["triangle", "linear", "constant"],
                   help="guidance over the views: triangle (min at the input view), linear, constant")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Nova3DError as err:
        print(f"nova3d {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
