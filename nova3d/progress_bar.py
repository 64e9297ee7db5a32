"""One progress bar per run: StepProgressBar counts optimizer steps up to max_steps, under our label.

Lightning's TQDMProgressBar first prints a "Training: 0/?" bar, then one "Epoch N" bar per epoch
(an epoch is only the loader's with_epoch length here, and fusion has one endless epoch), so a
run's console showed several bars, none with the run's real length. This one is created with the
run's length, resumes at the checkpoint's step and is kept across epochs; the losses stay in its
postfix. Validation keeps Lightning's transient bar.
"""
from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    def __init__(self, label: str, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.label = label
        self._total: int | None = None

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.label, total=self._total, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
                    unit="step")

    def on_train_start(self, trainer, *_: Any) -> None:
        self._total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar = self.init_train_tqdm()
        self._show(trainer.global_step)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n = trainer.global_step
        if self.train_progress_bar is not None and self._should_update(n, self.train_progress_bar.total):
            self._show(n)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: always "" in our run folders
        return metrics

    def _show(self, n: int) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = n
            self.train_progress_bar.refresh()
