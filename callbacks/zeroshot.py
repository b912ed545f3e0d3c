"""Zero-shot scores (lm-eval: its own tasks, or the paper's seven on local data) at the end of ``fit``,
``validate`` and ``test``, next to the dense model's (cached), into the run's report and logger;
lm-eval's own results JSON next to the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from jsonargparse.typing import PositiveInt
from lightning import LightningModule, Trainer

from hywia_lightning.evaluation.lm_eval_registry import results_json
from hywia_lightning.evaluation.zeroshot import ZeroShotTask, check_tasks, prepare_tasks, run_zeroshot, zeroshot_scores
from hywia_lightning.progress import show_info_logs

from .evaluation import Evaluation

log = logging.getLogger(__name__)

LM_EVAL_RESULTS = "zeroshot_lm_eval.json"


class ZeroShotEvaluation(Evaluation):
    kind = "zeroshot"

    def __init__(
        self, tasks: list[str], data_dir: str | None = None, datasets_dir: str | None = None,
        limit: PositiveInt | None = None, batch_size: PositiveInt = 8,
        baseline: bool = True, baseline_model: str | None = None,
    ) -> None:
        """
        Args:
            tasks: names of lm-eval's tasks, groups or tags (``hellaswag``, ``arc_challenge``, ``mmlu``,
                ...; ``lm-eval ls tasks`` lists them). Each of boolq, piqa, hellaswag, winogrande,
                arc_easy, arc_challenge, openbookqa is read from ``<data_dir>/<task>.jsonl`` when that
                file exists; every other task is lm-eval's own, its dataset from ``datasets_dir``, the
                datasets cache or the hub. An unknown name, and data that cannot be had, are refused
                before the model is loaded.
            data_dir: folder with ``<task>.jsonl`` files (``{"id", "context", "choices", "label"}`` a line).
            datasets_dir: folder with local copies of the hub datasets lm-eval's tasks read, at
                ``<datasets_dir>/<dataset_path>[/<dataset_name>]/`` (e.g. ``baber/piqa/`` with
                ``train.jsonl`` and ``validation.jsonl``); see docs/reporting.md.
            limit: evaluate the first this many items of each task (``None``: all).
            batch_size: loglikelihood requests per forward pass.
            baseline: also report the dense model's scores on the same items (measured once, cached).
            baseline_model: the dense model to compare with; ``None``: the job's model before pruning,
                or the model a pruned export was made from (its ``report.json``).
        """
        super().__init__(baseline, baseline_model)
        self.tasks = check_tasks(tasks, "ZeroShotEvaluation.tasks")
        self.data_dir, self.datasets_dir, self.limit, self.batch_size = data_dir, datasets_dir, limit, batch_size
        self._prepared: list[ZeroShotTask] | None = None  # by check: the data's identity for settings()
        self._unused: list[ZeroShotTask] | None = None  # check's task objects, for the first evaluation
        self._lm_eval: dict | None = None  # lm-eval's results of the last evaluate_model

    @staticmethod
    def check_arguments(init_args: dict[str, Any], key: str) -> None:
        """The task names and their data, from the job's config before any class is built: the CLI
        loads the model first. (The data is read again by :meth:`check`, from the datasets cache.)"""
        prepare_tasks(init_args.get("tasks"), init_args.get("data_dir"), init_args.get("datasets_dir"),
                      lambda name: f"{key}.{name}")

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepared = self._unused = self.prepare()  # a bad line or a dataset that cannot be had fails now, not after pruning

    def prepare(self) -> list[ZeroShotTask]:
        return prepare_tasks(self.tasks, self.data_dir, self.datasets_dir, self.setting)

    # -- Evaluation -----------------------------------------------------------------------------
    def settings(self) -> dict:
        prepared = self._prepared or self.prepare()
        settings = {
            "tasks": list(self.tasks), "limit": self.limit,
            "data_dir": str(Path(self.data_dir).expanduser().resolve()) if self.data_dir is not None else None,
            "files": [task.fingerprint for task in prepared],
        }
        if any(not task.source.startswith("local") for task in prepared):
            import lm_eval

            settings["lm_eval"] = getattr(lm_eval, "__version__", None)
        return settings

    def evaluate_model(self, model, tokenizer) -> dict:
        show_info_logs()
        log.info("zero-shot: %s, %s items each, batch size %d (lm-eval) ...", ", ".join(self.tasks),
                 "all" if self.limit is None else f"the first {self.limit}", self.batch_size)
        start = time.perf_counter()
        prepared, self._unused = self._unused or self.prepare(), None  # fresh task objects for each model
        results = run_zeroshot(model, tokenizer, prepared, self.limit, self.batch_size)
        self._lm_eval = results_json(results)
        scores = zeroshot_scores(results, prepared)
        seconds = time.perf_counter() - start
        items = sum(s["items"] for s in scores.values())
        log.info("zero-shot: %d items in %.1fs (%.2f items/s): %s", items, seconds, items / seconds,
                 ", ".join(f"{task} acc {100 * s['acc']:.1f}" for task, s in scores.items() if s.get("acc") is not None))
        return scores

    def files(self) -> dict[str, Any]:
        return {LM_EVAL_RESULTS: self._lm_eval} if self._lm_eval is not None else {}

    def section(self, results: dict) -> dict:
        return {"data_dir": self.data_dir, "datasets_dir": self.datasets_dir, "limit": self.limit,
                "lm_eval_results": LM_EVAL_RESULTS, **results}

    def metrics(self, prefix: str, results: dict) -> dict[str, float]:
        return {
            f"{prefix}/{task}/{name}": value
            for task, values in results.items() for name, value in values.items()
            if name != "items" and isinstance(value, (int, float))
        }
