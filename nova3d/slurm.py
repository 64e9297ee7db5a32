"""SLURM launch checks: the allocation must match the trainer config, the global batch must divide.

    python -m nova3d.slurm submit EXPERIMENT [key=value ...] [--sbatch-args "..."] [--dry-run]
    python -m nova3d.slurm check EXPERIMENT [key=value ...]      (train.sbatch runs it before srun)

`submit` (what `make slurm-train` runs) derives sbatch's --nodes/--ntasks-per-node/--gpus-per-node
from trainer.num_nodes/devices, so what is requested and what Lightning expects cannot drift.
`check` catches a hand-written `sbatch` whose allocation disagrees with the config, in the batch
script before any rank starts (Lightning would otherwise fail on every rank, or wait forever for
ranks that never come). One task per device; the world size is num_nodes x devices.

Imports no torch or Lightning: it runs in the batch script, where start-up time is wasted time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from nova3d.config import DataConfig, ExperimentConfig, TrainerConfig, load_experiment
from nova3d.errors import Nova3DError

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "experiments" / "slurm" / "train.sbatch"
INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning ignores SLURM in such jobs (srun --pty bash)


class SlurmLaunchError(Nova3DError):
    """The SLURM allocation, the trainer config and the batch size do not fit together."""


@dataclass(frozen=True)
class Allocation:
    """What SLURM gave this job (from the batch script's or a task's environment)."""

    job_id: str
    num_nodes: int
    num_tasks: int
    tasks_per_node: Optional[int]  # None: the job did not ask with --ntasks-per-node
    gpus_per_node: Optional[int]  # None: no GPUs allocated (or not reported)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Optional["Allocation"]:
        """The allocation of the SLURM job this process runs in; None outside one."""
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        nodes = _int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1", "SLURM_JOB_NUM_NODES")
        per_node = env.get("SLURM_NTASKS_PER_NODE")
        tasks = env.get("SLURM_NTASKS")
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")
        return cls(job_id=job_id, num_nodes=nodes,
                   num_tasks=_int(tasks, "SLURM_NTASKS") if tasks else nodes,
                   tasks_per_node=_tasks_per_node(per_node) if per_node else None,
                   gpus_per_node=_gpu_count(gpus) if gpus else None)


def _int(value: str, name: str) -> int:
    if not value.strip().isdigit():
        raise SlurmLaunchError(f"environment: {name}={value!r} is not a count")
    return int(value)


def _tasks_per_node(value: str) -> int:
    """SLURM_NTASKS_PER_NODE: "2", or "2(x3)" in some versions; uneven lists ("2,1") are refused."""
    match = re.fullmatch(r"(\d+)(?:\(x\d+\))?", value.strip())
    if match is None:
        raise SlurmLaunchError(f"environment: SLURM_NTASKS_PER_NODE={value!r}: nodes with different task "
                               f"counts are not supported (one task per device on every node)")
    return int(match.group(1))


def _gpu_count(value: str) -> int:
    """SLURM_GPUS_ON_NODE / _PER_NODE: "4" or "a100:4"."""
    return _int(value.rsplit(":", 1)[-1], "SLURM_GPUS_ON_NODE")


def launched_by_srun(env: Mapping[str, str] = os.environ) -> bool:
    """True in a task that srun started (Lightning's SLURMEnvironment rule: SLURM_NTASKS set and
    the job not an interactive shell)."""
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES


def devices_per_node(trainer: TrainerConfig, where: str) -> int:
    """trainer.devices as a count (an int, or a list of device indices)."""
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        if int(devices) < 1:
            raise SlurmLaunchError(f"{where}: trainer.devices must be >= 1, got {devices}")
        return int(devices)
    raise SlurmLaunchError(f"{where}: trainer.devices={devices!r}: under SLURM set it to the tasks "
                           f"(devices) per node, e.g. trainer.devices=8")


def world_size(trainer: TrainerConfig, where: str = "config") -> int:
    return trainer.num_nodes * devices_per_node(trainer, where)


def per_rank_batch_size(data: DataConfig, world: int, accumulate: int = 1, where: str = "config") -> int:
    """data.batch_size, or data.global_batch_size divided over world x accumulate (which must divide)."""
    if data.global_batch_size is None:
        return data.batch_size
    share = world * accumulate
    if data.global_batch_size < 1 or data.global_batch_size % share:
        raise SlurmLaunchError(
            f"{where}: data.global_batch_size={data.global_batch_size} does not divide over {world} rank(s) x "
            f"{accumulate} accumulation step(s); use a multiple of {share}")
    return data.global_batch_size // share


def apply_global_batch(cfg: ExperimentConfig, world: int) -> ExperimentConfig:
    """`cfg` with data.batch_size set from data.global_batch_size for `world` ranks (unchanged when unset)."""
    batch = per_rank_batch_size(cfg.data, world, cfg.trainer.accumulate_grad_batches, f"experiment {cfg.name}")
    if batch == cfg.data.batch_size:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch))


def check_allocation(cfg: ExperimentConfig, alloc: Allocation) -> int:
    """SlurmLaunchError unless `alloc` runs one task per device on trainer.num_nodes nodes and the
    global batch divides over the ranks; returns the per-rank batch size."""
    where = f"experiment {cfg.name}"
    t = cfg.trainer
    devices = devices_per_node(t, where)
    per_node = alloc.tasks_per_node
    if per_node is None:
        if alloc.num_tasks > 1:  # Lightning refuses this too, on every rank
            raise SlurmLaunchError(f"job {alloc.job_id}: {alloc.num_tasks} tasks without --ntasks-per-node; "
                                   f"submit with --nodes=N --ntasks-per-node=<trainer.devices>")
        per_node = 1
    if alloc.num_nodes != t.num_nodes:
        raise SlurmLaunchError(f"{where}: trainer.num_nodes={t.num_nodes} but job {alloc.job_id} has "
                               f"{alloc.num_nodes} node(s) (--nodes); make them equal")
    if per_node != devices:
        raise SlurmLaunchError(f"{where}: trainer.devices={devices} but job {alloc.job_id} runs {per_node} "
                               f"task(s) per node (--ntasks-per-node); one task per device: make them equal")
    if alloc.num_tasks != alloc.num_nodes * per_node:
        raise SlurmLaunchError(f"job {alloc.job_id}: {alloc.num_tasks} tasks on {alloc.num_nodes} node(s) is not "
                               f"{per_node} per node; use --nodes and --ntasks-per-node only")
    if t.accelerator != "cpu" and alloc.gpus_per_node is not None and alloc.gpus_per_node < devices:
        raise SlurmLaunchError(f"{where}: trainer.devices={devices} but job {alloc.job_id} has "
                               f"{alloc.gpus_per_node} GPU(s) per node (--gpus-per-node)")
    return per_rank_batch_size(cfg.data, alloc.num_tasks, t.accumulate_grad_batches, where)


def sbatch_command(cfg: ExperimentConfig, experiment: str, overrides: Sequence[str] = (),
                   sbatch_args: Sequence[str] = (), script: Path = TRAIN_SCRIPT) -> list[str]:
    """The sbatch call that trains `experiment`: sizes from trainer.num_nodes/devices, GPUs unless
    trainer.accelerator is "cpu"; `sbatch_args` (time, partition, account, ...) go before the script."""
    where = f"experiment {cfg.name}"
    devices = devices_per_node(cfg.trainer, where)
    per_rank_batch_size(cfg.data, cfg.trainer.num_nodes * devices, cfg.trainer.accumulate_grad_batches, where)
    command = ["sbatch", f"--job-name=nova3d-{cfg.name.replace('/', '-')}", f"--nodes={cfg.trainer.num_nodes}",
               f"--ntasks-per-node={devices}"]
    if cfg.trainer.accelerator != "cpu":
        command.append(f"--gpus-per-node={devices}")
    return [*command, *sbatch_args, str(script), experiment, *overrides]


def _describe(cfg: ExperimentConfig, alloc: Allocation, batch: int) -> str:
    world = alloc.num_tasks
    total = batch * world * cfg.trainer.accumulate_grad_batches
    return (f"job {alloc.job_id}: {alloc.num_nodes} node(s) x {world // alloc.num_nodes} task(s) = {world} rank(s); "
            f"batch {batch} per rank, {total} per optimizer step")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nova3d.slurm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "check this SLURM job's allocation against the config (in the batch script)"),
                       ("submit", "sbatch experiments/slurm/train.sbatch with sizes from the config")):
        p = sub.add_parser(name, help=text)
        p.add_argument("experiment")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
        if name == "submit":
            p.add_argument("--sbatch-args", default="", help='more sbatch options, e.g. "--time=24:00:00 -p gpu"')
            p.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not run it")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(args.experiment, args.overrides)
        if args.command == "check":
            alloc = Allocation.from_env()
            if alloc is None:
                raise SlurmLaunchError("environment: not inside a SLURM job (no SLURM_JOB_ID); use `submit`")
            print(f"nova3d.slurm: {_describe(cfg, alloc, check_allocation(cfg, alloc))}", flush=True)
            return 0
        command = sbatch_command(cfg, args.experiment, args.overrides, shlex.split(args.sbatch_args))
    except Nova3DError as err:
        print(f"nova3d.slurm {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    try:
        return subprocess.run(command, cwd=REPO_ROOT).returncode
    except FileNotFoundError:
        print("nova3d.slurm submit: error: sbatch not found (not on a SLURM login node?)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
