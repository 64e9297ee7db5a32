"""`python -m tests.slurm_probe` = `python -m nova3d.train` plus a callback that records, per rank,
the global step and the object ids of every training batch (JSON lines in $NOVA3D_PROBE_DIR).

train.sbatch runs it when NOVA3D_TRAIN_ENTRY=tests.slurm_probe. With NOVA3D_PROBE_PAUSE_AT=k, the
first launch of a job (not a requeued one) writes `paused-rank<r>` after step k and waits until
this rank has received the preemption signal, so a test can preempt at a known step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from nova3d.config import load_experiment
from nova3d.preemption import PreemptionCheckpoint
from nova3d.train import run_training

PAUSE_TIMEOUT_S = 180


class Probe(Callback):
    def __init__(self, out: Path, pause_at: int | None):
        self.out, self.pause_at = out, pause_at
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)

    def _write(self, trainer, record: dict) -> None:
        record = {"t": round(time.time(), 2), "rank": trainer.global_rank, "world": trainer.world_size, "restart": self.restart,
                  "node": int(os.environ.get("SLURM_NODEID", "0")), **record}
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, {"event": "start", "step": trainer.global_step})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._ids = list(batch.object_ids)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, {"event": "step", "step": trainer.global_step, "ids": self._ids})
        if self.pause_at is not None and self.restart == 0 and trainer.global_step == self.pause_at:
            preemption = next(cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint))
            (self.out / f"paused-rank{trainer.global_rank}").touch()
            deadline = time.monotonic() + PAUSE_TIMEOUT_S
            while not preemption.received and time.monotonic() < deadline:
                time.sleep(0.1)


def main() -> int:
    experiment, *overrides = sys.argv[1:]
    pause = os.environ.get("NOVA3D_PROBE_PAUSE_AT")
    probe = Probe(Path(os.environ["NOVA3D_PROBE_DIR"]), int(pause) if pause else None)
    run_training(load_experiment(experiment, overrides), sys.argv[1:], [probe])
    return 0


if __name__ == "__main__":
    sys.exit(main())
