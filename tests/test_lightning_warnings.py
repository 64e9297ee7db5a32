"""nova3d.train's Trainer without a logger, and Lightning's srun hint hidden only outside SLURM jobs
(nova3d.lightning_warnings). Builds Trainers, never fits: fast tier."""
from __future__ import annotations

import warnings

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor

from nova3d.config import load_experiment
from nova3d.lightning_warnings import SRUN_NOT_USED, in_slurm_job, quiet_lightning
from nova3d.run_dir import run_dir_for
from nova3d.train import build_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID")


def _trainer_warnings(tmp_path, monkeypatch, env: dict[str, str], tensorboard: bool = True):
    """(trainer, messages of the warnings raised while building it) with `srun` on PATH and `env`."""
    from lightning.fabric.plugins.environments import slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/srun" if name == "srun" else None)
    for var in _SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = load_experiment("tiny", [f"logging.root={tmp_path}", f"logging.tensorboard={str(tensorboard).lower()}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(cfg, run_dir_for(cfg, {}))
    return trainer, [str(w.message) for w in caught]


def test_no_logger_means_no_learning_rate_monitor(tmp_path, monkeypatch) -> None:
    """LearningRateMonitor refuses to start without a logger: logging.tensorboard=false crashed."""
    off, _ = _trainer_warnings(tmp_path, monkeypatch, {}, tensorboard=False)
    assert off.logger is None
    assert not any(isinstance(c, LearningRateMonitor) for c in off.callbacks)
    on, _ = _trainer_warnings(tmp_path, monkeypatch, {}, tensorboard=True)
    assert on.logger is not None and any(isinstance(c, LearningRateMonitor) for c in on.callbacks)


@pytest.mark.parametrize("env, shown", [
    ({}, False),  # a local run on a machine with SLURM installed
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "interactive"}, False),  # Lightning's interactive mode
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "bash"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train.sbatch"}, True),  # a batch job without srun: a real mistake
])
def test_srun_hint_only_inside_a_batch_job(tmp_path, monkeypatch, env, shown) -> None:
    _, messages = _trainer_warnings(tmp_path, monkeypatch, env)
    assert any(m.startswith("The `srun` command is available") for m in messages) == shown, messages


def test_quiet_lightning_patterns_and_job_detection() -> None:
    assert not in_slurm_job({}) and in_slurm_job({"SLURM_JOB_ID": "1"})
    assert not in_slurm_job({"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "bash"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning([r"boring"], env={}):
            warnings.warn("boring detail")
            warnings.warn("The `srun` command is available on your system but is not used. HINT: ...")
            warnings.warn("something else")
        with quiet_lightning(env={"SLURM_JOB_ID": "1"}):
            warnings.warn("The `srun` command is available on your system but is not used. HINT: ...")
    assert [str(w.message)[:14] for w in caught] == ["something else", "The `srun` com"]
    assert SRUN_NOT_USED.startswith("The `srun`")
