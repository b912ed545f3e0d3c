"""The end of ``fit``, ``validate`` and ``test`` as one hook, for evaluation and reporting callbacks.

``fit`` ends with ``on_fit_end``. ``validate`` and ``test`` end with ``on_validation_end`` /
``on_test_end``, but only when Lightning runs their loop: with ``limit_val_batches: 0`` or no
``val_dataloader`` it skips the loop and those hooks. So a callback runs there when the loop ran
(the model still on its device) and otherwise in ``teardown``, which always comes. During ``fit``
the validation hooks are the fit's own validation (sanity check, per-epoch) and are left alone.
"""

from __future__ import annotations

from lightning import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from .preflight import Preflight

EVALUATION_STAGES = {TrainerFn.VALIDATING: "validate", TrainerFn.TESTING: "test"}


class StageEnd(Preflight):
    """A callback whose :meth:`at_stage_end` runs once at the end of ``fit``, ``validate`` and ``test``
    (the base of the evaluations and the report)."""

    _stage_done: str | None = None

    def at_stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        raise NotImplementedError

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.at_stage_end(trainer, pl_module, "fit")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_of_evaluation(trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_of_evaluation(trainer, pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        evaluation = EVALUATION_STAGES.get(trainer.state.fn)
        if evaluation is not None and self._stage_done != evaluation:
            self.at_stage_end(trainer, pl_module, evaluation)
        self._stage_done = None
        super().teardown(trainer, pl_module, stage)

    def _end_of_evaluation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage = EVALUATION_STAGES.get(trainer.state.fn)
        if stage is not None and not trainer.sanity_checking and self._stage_done != stage:
            self._stage_done = stage
            self.at_stage_end(trainer, pl_module, stage)
