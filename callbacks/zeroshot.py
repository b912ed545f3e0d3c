"""Zero-shot accuracy (lm-eval, local data) at the end of ``fit``, ``validate`` and ``test``, next to
the dense model's (cached), into the run's report and logger."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from lightning import Callback, LightningModule, Trainer

from hywia_lightning.baseline import file_fingerprint
from hywia_lightning.progress import show_info_logs
from hywia_lightning.zeroshot import check_tasks, check_zeroshot, evaluate_zeroshot, task_file

from .dense_baseline import DenseBaseline
from .preflight import Preflight, run_preflight
from .stage_end import StageEnd

log = logging.getLogger(__name__)


class ZeroShotEvaluation(StageEnd, DenseBaseline, Preflight, Callback):
    kind = "zeroshot"

    def __init__(
        self, tasks: list[str], data_dir: str, limit: int | None = None, batch_size: int = 8,
        baseline: bool = True, baseline_model: str | None = None,
    ) -> None:
        """
        Args:
            tasks: any of boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa.
            data_dir: folder with one ``<task>.jsonl`` per task (``{"id", "context", "choices", "label"}`` a line).
            limit: evaluate the first this many items of each task (``None``: all).
            batch_size: loglikelihood requests per forward pass.
            baseline: also report the dense model's accuracies on the same items (measured once, cached).
            baseline_model: the dense model to compare with; ``None``: the job's model before pruning,
                or the model a pruned export was made from (its ``report.json``).
        """
        self.tasks = check_tasks(tasks, "ZeroShotEvaluation.tasks")
        if limit is not None and limit < 1:
            raise ValueError(f"limit={limit} must be at least 1 (or null for every item)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.data_dir, self.limit, self.batch_size = data_dir, limit, batch_size
        self.baseline, self.baseline_model = baseline, baseline_model

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_zeroshot(self.tasks, self.data_dir, "ZeroShotEvaluation.data_dir")  # a bad line fails now, not after pruning

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

    # -- DenseBaseline --------------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "tasks": list(self.tasks), "limit": self.limit, "data_dir": str(Path(self.data_dir).expanduser().resolve()),
            "files": [file_fingerprint(task_file(self.data_dir, task)) for task in self.tasks],
        }

    def evaluate_model(self, model, tokenizer) -> dict:
        show_info_logs()
        log.info("zero-shot: %s, %s items each, batch size %d (lm-eval) ...", ", ".join(self.tasks),
                 "all" if self.limit is None else f"the first {self.limit}", self.batch_size)
        start = time.perf_counter()
        scores = evaluate_zeroshot(model, tokenizer, self.tasks, self.data_dir, self.limit, self.batch_size)
        seconds = time.perf_counter() - start
        items = sum(s["items"] for s in scores.values())
        log.info("zero-shot: %d items in %.1fs (%.2f items/s): %s", items, seconds, items / seconds,
                 ", ".join(f"{task} acc {100 * s['acc']:.1f}" for task, s in scores.items()))
        return scores

    # -- StageEnd -------------------------------------------------------------------------------
    def at_stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        with pl_module.report.stage("zeroshot"):
            scores = self.evaluate_model(pl_module.model, pl_module.tokenizer)
        pl_module.report.record("zeroshot", {"data_dir": str(self.data_dir), "limit": self.limit, **scores})
        metrics = _metrics("zeroshot", scores)
        dense = self.dense_baseline(trainer, pl_module, stage, scores)
        if dense is not None:
            pl_module.report.record("baseline", {"zeroshot": dense})
            if "results" in dense:
                metrics.update(_metrics("dense/zeroshot", dense["results"]))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _metrics(prefix: str, scores: dict) -> dict[str, float]:
    return {
        f"{prefix}/{task}/{name}": value
        for task, values in scores.items() for name, value in values.items()
        if name != "items" and value is not None
    }
