"""Lightning warnings that are noise for nova3d's entry points (train, fuse), hidden in one place.

Lightning warns "The `srun` command is available on your system but is not used" whenever
`srun` is on PATH and the process was not started by srun (SLURMEnvironment._validate_srun_used).
Here SLURM is installed on every machine, so a plain local run would always print it. It is
hidden only outside a real SLURM job: SLURM_JOB_ID unset, or SLURM_JOB_NAME "bash"/"interactive"
(what Lightning itself treats as interactive, lightning.fabric's _is_slurm_interactive_mode).
Inside an sbatch job it stays: there a python command without srun is the mistake it warns of.

Lightning's "Tip: ... litlogger" line (an INFO log record) has no supported switch in lightning
2.6 (Lightning-AI/pytorch-lightning#21294), so it is left alone.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Mapping, Sequence

SRUN_NOT_USED = r"The `srun` command is available on your system but is not used"
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


def in_slurm_job(env: Mapping[str, str] = os.environ) -> bool:
    """True inside a batch SLURM job (not an interactive allocation, not a local run)."""
    return "SLURM_JOB_ID" in env and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES


@contextlib.contextmanager
def quiet_lightning(patterns: Sequence[str] = (), env: Mapping[str, str] = os.environ) -> Iterator[None]:
    """warnings.catch_warnings() that ignores messages matching `patterns` (regexes matched at
    the start, as warnings.filterwarnings does) and, outside a SLURM job, Lightning's srun hint."""
    with warnings.catch_warnings():
        for pattern in patterns:
            warnings.filterwarnings("ignore", message=pattern)
        if not in_slurm_job(env):
            warnings.filterwarnings("ignore", message=SRUN_NOT_USED)
        yield
