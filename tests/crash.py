"""Callbacks that kill their process abruptly, as a preempted node would. (The export's swap has
its own kill points, set by the environment: ``HYWIA_TEST_KILL_AT`` in :mod:`hywia_lightning.export.huggingface`.)"""

import os

from lightning import Callback


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os._exit(13)  # no cleanup, no final checkpoint: only what was saved before survives


class CrashAfterCheckpoint(CrashAtStep):
    """Killed as soon as the first checkpoint file of ``step`` is written: at a second checkpoint
    of the same step (``last.ckpt`` saved as a copy), or else at the next batch."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            self.saves += 1
            if self.saves > 1:
                os._exit(13)


class CrashInEstimation(Callback):
    """Killed after ``steps`` batches of importance estimation, as a preempted node would be midway
    through it (registered first, its ``setup`` runs before the pruning stage's)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def setup(self, trainer, pl_module, stage: str) -> None:
        from hywia_lightning.core.estimation import Estimator

        step, done = Estimator.step, []

        def counted(estimator, batch, indices):
            step(estimator, batch, indices)
            done.append(1)
            if len(done) == self.steps:
                os._exit(13)

        Estimator.step = counted
