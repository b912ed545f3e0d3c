"""Zero-shot accuracy (lm-eval, local data) of the fitted model at the end of ``fit``, into the
run's report and logger."""

from __future__ import annotations

import logging

from lightning import Callback, LightningModule, Trainer

from hywia_lightning.zeroshot import check_tasks, check_zeroshot, evaluate_zeroshot

from .preflight import Preflight, run_preflight

log = logging.getLogger(__name__)


class ZeroShotEvaluation(Preflight, Callback):
    def __init__(self, tasks: list[str], data_dir: str, limit: int | None = None, batch_size: int = 8) -> None:
        """
        Args:
            tasks: any of boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa.
            data_dir: folder with one ``<task>.jsonl`` per task (``{"id", "context", "choices", "label"}`` a line).
            limit: evaluate the first this many items of each task (``None``: all).
            batch_size: loglikelihood requests per forward pass.
        """
        self.tasks = check_tasks(tasks, "ZeroShotEvaluation.tasks")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit} must be at least 1 (or null for every item)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.data_dir, self.limit, self.batch_size = data_dir, limit, batch_size

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_zeroshot(self.tasks, self.data_dir, "ZeroShotEvaluation.data_dir")  # a bad line fails now, not after pruning

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        with pl_module.report.stage("zeroshot"):
            scores = evaluate_zeroshot(
                pl_module.model, pl_module.tokenizer, self.tasks, self.data_dir, self.limit, self.batch_size
            )
        pl_module.report.record("zeroshot", {"data_dir": str(self.data_dir), "limit": self.limit, **scores})
        metrics = {
            f"zeroshot/{task}/{name}": value
            for task, values in scores.items() for name, value in values.items()
            if name != "items" and value is not None
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
