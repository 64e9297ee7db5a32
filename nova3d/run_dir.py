"""The run directory of a training run, its rank-zero snapshot, and the checkpoint to resume from.

`<logging.root>/<experiment name>/<SLURM_JOB_ID or "local">`: never wall-clock time, so every
rank of a job and a requeued job (same SLURM job id) agree on it without talking (DESIGN.md §3.9).
Running the same experiment again locally continues the same run (see `resume_checkpoint`).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from lightning.pytorch.utilities import rank_zero_only

from nova3d.config import ExperimentConfig, to_yaml
from nova3d.errors import Nova3DError

REPO_ROOT = Path(__file__).resolve().parent.parent
LAST_CHECKPOINT = "last.ckpt"
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"  # what Lightning's SLURM requeue saves in default_root_dir


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"


def job_id(env: Mapping[str, str] = os.environ) -> str:
    """SLURM's job id (kept across requeues), else "local"."""
    return env.get("SLURM_JOB_ID") or "local"


def run_dir_for(cfg: ExperimentConfig, env: Mapping[str, str] = os.environ) -> RunDir:
    return RunDir(Path(cfg.logging.root) / cfg.name / job_id(env))


def git_state(repo: Path = REPO_ROOT) -> str:
    """'commit: <hash>', 'dirty: true|false' and the changed paths; 'commit: unknown' outside git."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return "commit: unknown\ndirty: unknown\n"
    status = git("status", "--porcelain") or ""
    return f"commit: {commit.strip()}\ndirty: {'true' if status.strip() else 'false'}\n{status}"


@rank_zero_only
def write_snapshot(run: RunDir, cfg: ExperimentConfig, argv: Sequence[str]) -> None:
    """Rank 0: config.yaml (resolved), git.txt, and one more line in command.txt per launch."""
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / "config.yaml").write_text(to_yaml(cfg))
    (run.path / "git.txt").write_text(git_state())
    command = shlex.join([sys.executable, "-m", "nova3d.train", *argv])
    with open(run.path / "command.txt", "a") as f:
        f.write(f"cd {shlex.quote(os.getcwd())} && {command}\n")


def resume_checkpoint(run: RunDir) -> Optional[Path]:
    """The newest of checkpoints/last.ckpt and Lightning's SLURM-requeue hpc_ckpt_*.ckpt, if any
    (Nova3DError if it is truncated: resuming would crash deep in torch.load)."""
    found = [p for p in [run.last_checkpoint, *run.path.glob(HPC_CHECKPOINT_GLOB)] if p.is_file()]
    newest = max(found, key=lambda p: p.stat().st_mtime) if found else None
    if newest is not None:
        check_checkpoint_file(newest)
    return newest


def check_checkpoint_file(path: Path) -> None:
    """A torch checkpoint is a zip whose directory sits at its end: a cut-off file has none. This
    reads only that directory, not the (possibly many-GB) tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise Nova3DError(f"{path}: not a complete checkpoint ({err}); move it away to start the run over, "
                          "or put back an intact copy") from err
