"""Zero-shot accuracy (lm-eval, local data) at the end of ``fit``, ``validate`` and ``test``, next to
the dense model's (cached), into the run's report and logger."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from jsonargparse.typing import PositiveInt
from lightning import LightningModule, Trainer

from hywia_lightning.baseline import file_fingerprint
from hywia_lightning.progress import show_info_logs
from hywia_lightning.zeroshot import check_tasks, check_zeroshot, evaluate_zeroshot, task_file

from .evaluation import Evaluation

log = logging.getLogger(__name__)


class ZeroShotEvaluation(Evaluation):
    kind = "zeroshot"

    def __init__(
        self, tasks: list[str], data_dir: str, limit: PositiveInt | None = None, batch_size: PositiveInt = 8,
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
        super().__init__(baseline, baseline_model)
        self.tasks = check_tasks(tasks, "ZeroShotEvaluation.tasks")
        self.data_dir, self.limit, self.batch_size = data_dir, limit, batch_size

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_zeroshot(self.tasks, self.data_dir, "ZeroShotEvaluation.data_dir")  # a bad line fails now, not after pruning

    # -- Evaluation -----------------------------------------------------------------------------
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

    def section(self, results: dict) -> dict:
        return {"data_dir": str(self.data_dir), "limit": self.limit, **results}

    def metrics(self, prefix: str, results: dict) -> dict[str, float]:
        return {
            f"{prefix}/{task}/{name}": value
            for task, values in results.items() for name, value in values.items()
            if name != "items" and value is not None
        }
