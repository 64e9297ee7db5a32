"""`trainer.max_time` as a cap on this launch's training time, not on the run's total.

Lightning's own Timer (what `Trainer(max_time=...)` installs) stores the time already trained in the
checkpoint and counts on from it after a resume, so a run continued with the same cap stops at its
first step. A wall-clock cap is a property of the launch (a SLURM job's time limit, a CPU piece of a
long recipe), so each launch gets the whole of it.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Timer


class PieceTimer(Timer):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep counting from zero: the earlier pieces' time is not this launch's."""
