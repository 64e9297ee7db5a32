"""Lightning warnings that are noise for nova3d's entry points (train, fuse), hidden in one place.

Lightning warns "The `srun` command is available on your system but is not used" whenever
`srun` is on PATH and the process was not started by srun (SLURMEnvironment._validate_srun_used).
Here SLURM is installed on every machine, so a plain local run would always print it. It is
hidden only outside a real SLURM job: SLURM_JOB_ID unset, or SLURM_JOB_NAME "bash"/"interactive"
(what Lightning itself treats as interactive, lightning.fabric's _is_slurm_interactive_mode).
Inside an sbatch job it stays: there a python command without srun is the mistake it warns of.

Lightning's INFO records (the "Tip: ... litlogger" line, which has no switch in lightning 2.6,
Lightning-AI/pytorch-lightning#21294; "GPU available / TPU available" lines; "`Trainer.fit`
stopped", "Received SIGTERM", "`weights_only` was not set") are raised to WARNING inside the
context: our own progress bar, summary line and error line say what a user needs. Lightning 2.6
on torch 2.11 also warns about its own use of the deprecated `LeafSpec` on every step; that is
hidden too. Every other warning stays visible.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator, Mapping, Sequence

SRUN_NOT_USED = r"The `srun` command is available on your system but is not used"
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")
THIRD_PARTY_NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)  # lightning's own call, not ours
_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 # "[rank: 0] Received SIGTERM: 15" beside our own one-line error (nova3d.signals;
                 # training's requeue lines are nova3d.preemption's, not Lightning's)
                 "lightning.pytorch.trainer.connectors.signal_connector",
                 # "`weights_only` was not set, defaulting to `False`." on a checkpoint save
                 "lightning.pytorch.trainer.connectors.checkpoint_connector")


def in_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a batch SLURM job (not an interactive allocation, not a local run)."""
    return "SLURM_JOB_ID" in env and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES


@contextlib.contextmanager
def quiet_lightning(patterns: Sequence[str] = (), env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """warnings.catch_warnings() that ignores messages matching `patterns` (regexes matched at
    the start, as warnings.filterwarnings does) and, outside a SLURM job, Lightning's srun hint."""
    loggers = [logging.getLogger(name) for name in _INFO_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for pattern in (*patterns, *THIRD_PARTY_NOISE):
            warnings.filterwarnings("ignore", message=pattern)
        if not in_slurm_job(env):
            warnings.filterwarnings("ignore", message=SRUN_NOT_USED)
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
