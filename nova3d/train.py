"""Train the multi-view diffusion model: config -> datamodule + system + callbacks + trainer -> fit.

    python -m nova3d.train EXPERIMENT [key=value ...]      (also `make train EXP=...`, `nova3d train`)

Thin on purpose (DESIGN.md §3.1): everything it builds is described by the experiment config.
The run directory (nova3d.run_dir) gets the snapshot, TensorBoard logs and checkpoints; when it
already holds a checkpoint the run continues from it (global step, optimizer, EMA, schedule).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only

from nova3d.config import ExperimentConfig, TrainerConfig, load_experiment
from nova3d.data.datamodule import MultiViewDataModule
from nova3d.errors import Nova3DError
from nova3d.hub_noise import quiet_hub_libraries
from nova3d.lightning_warnings import quiet_lightning
from nova3d.piece_timer import PieceTimer
from nova3d.preemption import PreemptionCheckpoint
from nova3d.progress_bar import StepProgressBar
from nova3d.run_dir import RunDir, resume_checkpoint, run_dir_for, write_snapshot
from nova3d.slurm import apply_global_batch, launched_by_srun
from nova3d.systems.mv_diffusion import MultiViewDiffusion

MONITOR = "val/loss"
DEMO_SHARDS = "outputs/demo/shards"  # where `make demo` writes the shards tiny.yaml trains on
TOY_SHARDS = "data/toy/shards"  # where `make toy-data` writes the toy recipe's shards
# Lightning warnings that describe what we do on purpose: a frozen (eval-mode) conditioner, and
# checkpoints already in the run dir when a run resumes.
EXPECTED_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"Checkpoint directory .* exists and is not empty")


def parameter_summary(system: L.LightningModule) -> str:
    """One line in place of Lightning's model-summary table."""
    trainable = sum(p.numel() for p in system.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in system.parameters() if not p.requires_grad)
    return f"{trainable / 1e6:.2f} M trainable parameters, {frozen / 1e6:.2f} M frozen"


@rank_zero_only
def _note(message: str) -> None:
    print(f"nova3d.train: {message}", flush=True)


def resolve_precision(cfg: TrainerConfig) -> str:
    """cfg.precision, except that a CPU run uses "32-true" (bf16/fp16 autocast on CPU is slow and lossy)."""
    precision = str(cfg.precision)
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and "16" in precision:
        _note(f"running on CPU: precision {precision!r} -> '32-true'")
        return "32-true"
    return precision


def build_callbacks(cfg: ExperimentConfig, run: RunDir) -> list[Callback]:
    t = cfg.trainer
    return [
        # last.ckpt every N steps, whether or not validation has run: what a restart resumes from.
        ModelCheckpoint(dirpath=run.checkpoints, save_last=True, save_top_k=0,
                        every_n_train_steps=t.checkpoint_every_n_steps),
        # best.ckpt: checked after every validation, on fresh validation metrics.
        ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor=MONITOR, mode="min", save_top_k=1,
                        save_on_train_epoch_end=False, auto_insert_metric_name=False),
        StepProgressBar("train", refresh_rate=max(1, t.log_every_n_steps)),
        # trainer.max_time caps each launch (Lightning's max_time would cap the run's total across resumes).
        *([PieceTimer(duration=t.max_time, interval="step", verbose=False)] if t.max_time else []),
        # It logs through the logger and refuses to start without one (logging.tensorboard=false).
        *([LearningRateMonitor(logging_interval="step")] if cfg.logging.tensorboard else []),
    ]


def build_trainer(cfg: ExperimentConfig, run: RunDir, extra_callbacks: Sequence[Callback] = ()) -> L.Trainer:
    t = cfg.trainer
    logger = (TensorBoardLogger(save_dir=run.path, name="tensorboard", version="", default_hp_metric=False)
              if cfg.logging.tensorboard else False)
    # Under srun, Lightning's SLURM environment gives ranks and rendezvous; its own requeue handler is
    # replaced by nova3d.preemption (it checkpoints inside the signal handler, unsafe with DDP).
    plugins = [SLURMEnvironment(auto_requeue=False)] if launched_by_srun() else None
    with quiet_lightning():  # Lightning's srun hint on a local run (nova3d.lightning_warnings)
        return L.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            precision=resolve_precision(t), max_steps=t.max_steps,
            accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
            # Validation every N global steps across epochs (an epoch is only the loader's with_epoch length).
            val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
            limit_val_batches=t.limit_val_batches if t.limit_val_batches is not None else 1.0,
            num_sanity_val_steps=t.num_sanity_val_steps, log_every_n_steps=t.log_every_n_steps,
            # The datamodule splits shards by rank itself (resampled, with_epoch): no DistributedSampler.
            use_distributed_sampler=False,
            default_root_dir=run.path, logger=logger, callbacks=[*build_callbacks(cfg, run), *extra_callbacks],
            plugins=plugins, enable_model_summary=False,  # run_training says it in one line
        )


def run_training(cfg: ExperimentConfig, argv: Sequence[str] = (),
                 extra_callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """Fit `cfg` in its run directory (continuing from its checkpoint if it has one); returns the Trainer."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of mixed precision
    run = run_dir_for(cfg)
    ckpt = resume_checkpoint(run)  # a truncated last.ckpt is named before the run's files are touched
    preemption = PreemptionCheckpoint(run.path)
    trainer = build_trainer(cfg, run, [preemption, *extra_callbacks])
    cfg = apply_global_batch(cfg, trainer.world_size)  # data.global_batch_size -> per-rank batch_size
    write_snapshot(run, cfg, argv)
    datamodule = MultiViewDataModule(cfg.data)
    with quiet_hub_libraries():  # a conditioner or init_from folder: diffusers' bars and accelerate hint
        system = MultiViewDiffusion(cfg)
        if ckpt is None and cfg.model.init_from:
            system.init_unet_from(cfg.model.init_from)
    _note(f"resuming from {ckpt}" if ckpt is not None else
          f"new run: UNet initialised from {cfg.model.init_from}" if cfg.model.init_from else "new run")
    _note(parameter_summary(system))
    with quiet_lightning(EXPECTED_WARNINGS):
        # Our checkpoints hold tensors and plain containers only, so the safe loader suffices.
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    # The step checkpoints miss the final step unless max_steps is a multiple of their interval.
    # After a preemption the checkpoint is saved and the requeue's SIGTERM is on its way: write nothing more.
    finished = trainer.state.status == TrainerStatus.FINISHED and not preemption.requested
    if finished and trainer.global_step % cfg.trainer.checkpoint_every_n_steps:
        # the full state, to resume from: said, not left to Lightning's default (which logs a line)
        trainer.save_checkpoint(run.last_checkpoint, weights_only=False)
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m nova3d.train", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="name under experiments/ (tiny, gta_full, ablations/no_gta) or a .yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. trainer.max_steps=10")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        trainer = run_training(load_experiment(args.experiment, args.overrides), argv)
    except Nova3DError as err:
        hint = (" (run `make demo` first: it writes the demo shards)" if DEMO_SHARDS in str(err) else
                " (run `make toy-data` first: it renders the toy recipe's shards)" if TOY_SHARDS in str(err) else "")
        print(f"nova3d.train: error: {err}{hint}", file=sys.stderr)
        return 2
    _note(summary_line(trainer, time.perf_counter() - start))
    return 0


def summary_line(trainer: L.Trainer, seconds: float) -> str:
    """The run in one line: where it stopped, its last losses, where its checkpoints are."""
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("loss") and v.numel() == 1}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(losses.items()))
    state = "finished" if trainer.state.status == TrainerStatus.FINISHED else str(trainer.state.status.value)
    return (f"{state} at step {trainer.global_step} of {trainer.max_steps} in {seconds:.0f} s"
            + (f"; {shown}" if shown else "") + f"; checkpoints in {trainer.default_root_dir}/checkpoints")


if __name__ == "__main__":
    sys.exit(main())
