"""Train the toy recipe's VAE and write a conditioner folder (vae/ + image_encoder/ + feature_extractor/).

    python -m nova3d.train_vae autoencoder/toy [key=value ...]      (also `make toy-vae`)

Same shards, DataModule, run directory and checkpoint resume as nova3d.train. After fitting:
vae.config.scaling_factor is set so training latents have unit standard deviation (SVD's 0.18215
plays that role for its VAE), the reconstruction quality is measured on the test shards (RGB PSNR
on white, normal mean angular error on the true foreground) and <run>/conditioner/ is written
(staged, then renamed) with metrics.json: point `model.conditioner` of a diffusion experiment at it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from nova3d.atomic import check_writable, staged_folder, write_text_atomic
from nova3d.config import load_experiment, to_yaml
from nova3d.data.datamodule import MultiViewDataModule
from nova3d.data.manifest import existing_shards
from nova3d.errors import Nova3DError
from nova3d.lightning_warnings import quiet_lightning
from nova3d.models.autoencoder import AutoencoderExperimentConfig, build_clip
from nova3d.models.conditioning import FEATURE_EXTRACTOR_DIR, IMAGE_ENCODER_DIR, VAE_DIR
from nova3d.progress_bar import StepProgressBar
from nova3d.run_dir import git_state, resume_checkpoint, run_dir_for
from nova3d.signals import exit_code, interrupts_as_errors
from nova3d.systems.autoencoder import AutoencoderSystem, domain_videos
from nova3d.train import EXPECTED_WARNINGS, resolve_precision

CONDITIONER_DIR = "conditioner"
METRICS_FILE = "metrics.json"


def _loader(cfg: AutoencoderExperimentConfig, shards: str, split: str):
    """Every object of `shards` (their manifest's `split`) once, white background, no roll."""
    urls = existing_shards(shards, split=split)
    data = MultiViewDataModule(type(cfg.data)(**{**asdict(cfg.data), "val_shards": urls, "batch_size": 1}))
    data.setup("validate")
    return data.val_dataloader()  # without a Trainer it yields MultiViewBatch


@torch.no_grad()
def latent_scale(system: AutoencoderSystem, cfg: AutoencoderExperimentConfig) -> float:
    """1 / std of the posterior means of `scale_samples` training objects' videos (both domains)."""
    loader = _loader(cfg, cfg.data.train_shards, "train")
    means = []
    for i, batch in enumerate(loader):
        if i >= cfg.optim.scale_samples:
            break
        videos = domain_videos(batch)
        means.append(system.vae.encode(videos.flatten(0, 1)).latent_dist.mode())
    if not means:
        raise Nova3DError(f"{cfg.data.train_shards}: no objects to measure the latent scale on")
    return float(1.0 / torch.cat(means).std())


@torch.no_grad()
def reconstruction_metrics(system: AutoencoderSystem, cfg: AutoencoderExperimentConfig) -> dict:
    """RGB PSNR (whole image, on white) and normal angular error (degrees, true foreground) on test objects."""
    shards = cfg.test_shards or cfg.data.val_shards or cfg.data.train_shards
    loader = _loader(cfg, shards, "test" if cfg.test_shards else "val")
    psnr, angle, count = [], [], 0
    for batch in loader:
        if count >= cfg.test_objects:
            break
        recon, _ = system.reconstruct(domain_videos(batch), sample=False)
        rgb, normals = ((recon[0] + 1) / 2).clamp(0, 1), torch.nn.functional.normalize(recon[1], dim=1)
        mse = ((rgb - batch.rgb[0]) ** 2).mean(dim=(1, 2, 3))
        psnr += (-10 * torch.log10(mse.clamp_min(1e-10))).tolist()
        fg = batch.masks[0, :, 0] > 0.5
        cos = (normals * batch.normals[0]).sum(dim=1).clamp(-1, 1)
        angle.append(torch.rad2deg(torch.acos(cos))[fg])
        count += 1
    return {"objects": count, "shards": str(shards), "rgb_psnr": sum(psnr) / len(psnr),
            "normal_error_deg": float(torch.cat(angle).mean())}


def write_conditioner(system: AutoencoderSystem, cfg: AutoencoderExperimentConfig, out: Path, metrics: dict) -> Path:
    """out/{vae, image_encoder, feature_extractor}/ + metrics.json, staged (nova3d.atomic.staged_folder):
    a failed write keeps the previous conditioner."""
    clip, feature_extractor = build_clip(cfg.model, cfg.seed)
    with staged_folder(out) as partial:
        system.vae.save_pretrained(partial / VAE_DIR)
        clip.save_pretrained(partial / IMAGE_ENCODER_DIR)
        feature_extractor.save_pretrained(partial / FEATURE_EXTRACTOR_DIR)
        (partial / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def check_inputs(cfg: AutoencoderExperimentConfig, run_dir) -> None:
    """Everything that can be checked before the run folder is touched: the shards, the run
    folder's place, a checkpoint to resume from. A bad input leaves a finished run as it was."""
    existing_shards(cfg.data.train_shards, split="train")
    for shards, split in ((cfg.data.val_shards, "val"), (cfg.test_shards, "test")):
        if shards:
            existing_shards(shards, split=split)
    check_writable(run_dir.path, "logging.root")
    resume_checkpoint(run_dir)  # a truncated last.ckpt is named now


def write_run_snapshot(run_dir, cfg: AutoencoderExperimentConfig, argv: Sequence[str]) -> None:
    """config.yaml, git.txt and one more line in command.txt, which records this command
    (nova3d.run_dir.write_snapshot records `nova3d.train`)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir.path / "config.yaml", to_yaml(cfg))
    write_text_atomic(run_dir.path / "git.txt", git_state())
    command = shlex.join([sys.executable, "-m", "nova3d.train_vae", *argv])
    with open(run_dir.path / "command.txt", "a") as f:
        f.write(f"cd {shlex.quote(os.getcwd())} && {command}\n")


def run(cfg: AutoencoderExperimentConfig, argv: Sequence[str] = ()) -> Path:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = run_dir_for(cfg)
    check_inputs(cfg, run_dir)
    write_run_snapshot(run_dir, cfg, argv)
    t = cfg.trainer
    logger = TensorBoardLogger(save_dir=run_dir.path, name="tensorboard", version="", default_hp_metric=False)
    with quiet_lightning():
        trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, precision=resolve_precision(t),
                            max_steps=t.max_steps, gradient_clip_val=t.gradient_clip_val,
                            val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
                            limit_val_batches=t.limit_val_batches if t.limit_val_batches is not None else 1.0,
                            num_sanity_val_steps=t.num_sanity_val_steps, log_every_n_steps=t.log_every_n_steps,
                            use_distributed_sampler=False, default_root_dir=run_dir.path, logger=logger,
                            enable_model_summary=False,
                            callbacks=[ModelCheckpoint(dirpath=run_dir.checkpoints, save_last=True, save_top_k=0,
                                                       every_n_train_steps=t.checkpoint_every_n_steps),
                                       StepProgressBar("train vae", refresh_rate=max(1, t.log_every_n_steps))])
    system = AutoencoderSystem(cfg)
    with quiet_lightning(EXPECTED_WARNINGS):
        trainer.fit(system, datamodule=MultiViewDataModule(cfg.data), ckpt_path=resume_checkpoint(run_dir),
                    weights_only=True)
    trainer.save_checkpoint(run_dir.last_checkpoint, weights_only=False)  # the full state, said (not defaulted)
    system.eval()
    system.vae.register_to_config(scaling_factor=latent_scale(system, cfg))
    metrics = {"global_step": trainer.global_step, "scaling_factor": system.vae.config.scaling_factor,
               **reconstruction_metrics(system, cfg)}
    out = write_conditioner(system, cfg, run_dir.path / CONDITIONER_DIR, metrics)
    print(f"nova3d.train_vae: {out} (RGB PSNR {metrics['rgb_psnr']:.2f} dB, normal error "
          f"{metrics['normal_error_deg']:.2f} deg on {metrics['objects']} test objects, "
          f"scaling_factor {metrics['scaling_factor']:.4f})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m nova3d.train_vae", description=__doc__.split("\n")[0])
    p.add_argument("experiment", help="name under experiments/ (autoencoder/toy) or a .yaml")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.max_steps=10")
    args = p.parse_args(argv)
    try:
        if Path(args.experiment).suffix in (".yaml", ".yml") and not Path(args.experiment).is_file():
            raise Nova3DError(f"{args.experiment}: no such file (or name an experiment under experiments/, "
                              "e.g. autoencoder/toy)")
        cfg = load_experiment(args.experiment, args.overrides)
        if not isinstance(cfg, AutoencoderExperimentConfig):
            raise Nova3DError(f"{args.experiment}: not an autoencoder experiment (experiments/autoencoder/)")
        with interrupts_as_errors():
            run(cfg, argv)
    except Nova3DError as err:
        print(f"nova3d.train_vae: error: {err}", file=sys.stderr)
        return exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
