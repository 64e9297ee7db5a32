"""Preemption-safe training: on SIGUSR1, checkpoint at the next step on every rank, then requeue.

train.sbatch asks SLURM for SIGUSR1 90 s before the time limit (`--signal=SIGUSR1@90`); a
preempting scheduler or `scancel --signal=USR1 JOB` sends the same. The handler only sets a flag:
at the end of the next optimizer step all ranks agree on it (one tiny all-reduce per step), save
`<run dir>/hpc_ckpt_<n>.ckpt` together, rank 0 runs `scontrol requeue`, and training stops. The
requeued job has the same SLURM job id, so the same run directory, and nova3d.run_dir's
`resume_checkpoint` picks that checkpoint up: the run goes on from the saved global step.

Why not Lightning's own auto-requeue: it saves inside the signal handler, which runs between any
two bytecodes — on one rank possibly while the other waits in a gradient all-reduce, so the
checkpoint's barrier can deadlock or the state be half-updated (Lightning issue #21406).
Here the signal is turned into a decision at a step boundary that every rank reaches.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from nova3d.run_dir import HPC_CHECKPOINT_GLOB

REQUEUE_SIGNAL = signal.SIGUSR1
TMP_SUFFIX = ".tmp"  # saved under this suffix, renamed when complete: a kill mid-save leaves no bad .ckpt


def slurm_job_to_requeue(env=os.environ) -> Optional[str]:
    """`scontrol requeue`'s argument for this job ("<array job>_<task>" in an array), None outside SLURM."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def next_hpc_checkpoint(run_path: Path) -> Path:
    """run_path/hpc_ckpt_<n+1>.ckpt after the highest n there (Lightning's naming)."""
    numbers = [int(p.stem.rsplit("_", 1)[-1]) for p in run_path.glob(HPC_CHECKPOINT_GLOB)
               if p.stem.rsplit("_", 1)[-1].isdigit()]
    return run_path / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class PreemptionCheckpoint(Callback):
    """Turns REQUEUE_SIGNAL into: checkpoint on all ranks at a step boundary, requeue, stop.

    `requested` tells the caller afterwards that the fit stopped for preemption (so it must not
    write a "final" checkpoint that the requeue's SIGTERM could cut short).
    """

    def __init__(self, run_path: str | os.PathLike, requeue: bool = True):
        self.run_path = Path(run_path)
        self.requeue = requeue
        self.received = False  # set by the signal handler (this process)
        self.requested = False  # all ranks agreed: checkpoint saved, training stopping
        self.saved: Optional[Path] = None
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:  # nothing else here: it runs between arbitrary bytecodes
        self.received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the loaders start, so forked workers inherit a handler instead of dying on the signal.
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(REQUEUE_SIGNAL, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: not a step boundary (the same batch_idx on every rank)
        stop = trainer.strategy.reduce_boolean_decision(self.received, all=False)  # any rank signalled
        if not stop or self.requested:
            return
        self.requested = True
        self.saved = self._save(trainer)
        _say(f"nova3d: preemption signal: saved {self.saved} at step {trainer.global_step}")
        # One checkpoint is all the warning time should be spent on: ModelCheckpoint(save_last=True)
        # would write last.ckpt again when training ends (Lightning 2.6). The process is ending anyway.
        for callback in trainer.checkpoint_callbacks:
            callback.save_last = False
        if self.requeue and trainer.is_global_zero:
            self._requeue()
        trainer.should_stop = True

    def _save(self, trainer: L.Trainer) -> Path:
        """Every rank takes part (save_checkpoint ends in a barrier); rank 0 writes, renames, prunes."""
        path = Path(trainer.strategy.broadcast(str(next_hpc_checkpoint(self.run_path)) if trainer.is_global_zero
                                               else None))
        tmp = path.with_name(path.name + TMP_SUFFIX)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
            for old in self.run_path.glob(HPC_CHECKPOINT_GLOB):  # the newest is all a resume needs
                if old != path:
                    old.unlink(missing_ok=True)
        trainer.strategy.barrier("nova3d.preemption.saved")
        return path

    def _requeue(self) -> None:
        job = slurm_job_to_requeue()
        if job is None:
            _say("nova3d: not a SLURM job: stopping; run the same command again to resume")
            return
        # Said before scontrol: the requeue makes SLURM send SIGTERM at once, which can end this
        # process before scontrol returns.
        _say(f"nova3d: requeueing SLURM job {job}")
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            rank_zero_warn(f"nova3d: scontrol requeue {job} failed ({err}); resubmit to resume")
            return
        if done.returncode:
            rank_zero_warn(f"nova3d: scontrol requeue {job} failed: {done.stderr.strip()}; resubmit to resume")
        else:
            _say(f"nova3d: requeued SLURM job {job}")


@rank_zero_only
def _say(message: str) -> None:
    """One line on stderr from rank 0, flushed: the console's quiet logging level (nova3d.lightning_warnings)
    drops Lightning's rank_zero_info, and a preempted job may be killed right after."""
    print(message, file=sys.stderr, flush=True)
