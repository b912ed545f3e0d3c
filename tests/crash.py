"""A callback that kills its process abruptly at a given step, as a preempted node would."""

import os

from lightning import Callback


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(13)  # no cleanup, no final checkpoint: only what was saved before survives
