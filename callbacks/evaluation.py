"""The base of the evaluation callbacks: evaluate the model at the end of ``fit``, ``validate`` and
``test`` (:class:`~callbacks.stage_end.StageEnd`), into the run's report and logger, next to the
dense model's numbers, which are measured once, before pruning, then cached.

A subclass gives its :attr:`~Evaluation.kind` (its report section), :meth:`~Evaluation.check`,
:meth:`~Evaluation.settings`, :meth:`~Evaluation.evaluate_model`, and how its results become a
report section and logged metrics (:meth:`~Evaluation.section`, :meth:`~Evaluation.metrics`), and
optionally files next to the report (:meth:`~Evaluation.files`).

Where the dense model comes from, in order:

1. this run prunes the model: it is evaluated in ``on_before_slicing`` (the plan is final, the
   weights still dense), unless the cache already has it;
2. this run does not change the model (``validate``/``test``, or ``fit`` without pruning and
   without a training step) and the model is not a pruned export: its own numbers are the
   baseline, and go into the cache for later runs;
3. otherwise (an export of a pruned model, a model trained in this run): ``baseline_model``, or
   the unpruned model the export's ``report.json`` names, is loaded and evaluated, unless cached.

The cache is ``$HYWIA_CACHE/baselines/`` (see :mod:`hywia_lightning.evaluation.baseline`). Only global rank 0
evaluates, as the evaluations themselves do; but where the pruning callback sharded the weights
(``shard_weights``), every forward pass of the dense model and of the pruned one is a collective,
so every rank evaluates them (the same chunks; in case 1 rank 0's cache decides whether) and rank 0
keeps the numbers.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from lightning import LightningModule, Trainer

from hywia_lightning.core.plan import PruningPlan
from hywia_lightning.distributed.sharded_model import has_sharded_weights
from hywia_lightning.evaluation.baseline import (
    baseline_key, cached_baseline, dense_reference, measure_baseline, model_identity, read_baseline, store_baseline,
)
from hywia_lightning.models.loading import load_causal_lm

from .pruning_hooks import PruningHooks
from .stage_end import StageEnd

log = logging.getLogger(__name__)


class Evaluation(StageEnd, PruningHooks):
    """An evaluation of the model at the end of every stage, with its dense baseline
    (``baseline``: on or off; ``baseline_model``: the dense model to compare with, or ``None``)."""

    kind: str  # the report section, the metrics' prefix and the baseline cache's kind
    _dense: dict | None = None

    def __init__(self, baseline: bool = True, baseline_model: str | None = None) -> None:
        self.baseline, self.baseline_model = baseline, baseline_model

    def settings(self) -> dict:
        """Everything the evaluation's numbers depend on (the cache key)."""
        raise NotImplementedError

    def evaluate_model(self, model, tokenizer) -> dict:
        raise NotImplementedError

    def section(self, results: dict) -> dict:
        """The report section of this evaluation's ``results``."""
        raise NotImplementedError

    def metrics(self, prefix: str, results: dict) -> dict[str, float]:
        """The logged metrics of ``results`` (this model's, or the dense model's), named from ``prefix``."""
        raise NotImplementedError

    def files(self) -> dict[str, Any]:
        """``{file name: JSON data}`` of the evaluation just run, to be written next to ``report.json``
        (asked right after this model's evaluation, before the dense model's)."""
        return {}

    def at_stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if has_sharded_weights(pl_module.model) and not trainer.is_global_zero:
            self.evaluate_model(pl_module.model, pl_module.tokenizer)  # its forward passes are collectives
            return
        if not trainer.is_global_zero:
            return
        with pl_module.report.stage(self.kind):
            results = self.evaluate_model(pl_module.model, pl_module.tokenizer)
        pl_module.report.record(self.kind, self.section(results))
        for name, data in self.files().items():
            pl_module.report.attach(name, data)
        metrics = self.metrics(self.kind, results)
        dense = self.dense_baseline(trainer, pl_module, stage, results)
        if dense is not None:
            pl_module.report.record("baseline", {self.kind: dense})
            if "results" in dense:
                metrics.update(self.metrics(f"dense/{self.kind}", dense["results"]))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- the cache key --------------------------------------------------------------------------
    @staticmethod
    def _model_options(pl_module: LightningModule) -> tuple[str, str, str | None]:
        hparams = pl_module.hparams
        return hparams.get("model_name_or_path"), hparams.get("dtype", "float32"), hparams.get("cache_dir")

    def _key(self, pl_module: LightningModule, model_name_or_path: str) -> dict:
        _, dtype, _ = self._model_options(pl_module)
        return baseline_key(model_name_or_path, dtype, self.kind, self.settings())

    # -- case 1: before this run's slicing ------------------------------------------------------
    def on_before_slicing(self, trainer: Trainer, pl_module: LightningModule, plan: PruningPlan) -> None:
        sharded = has_sharded_weights(pl_module.model)  # FSDP2: every forward pass is a collective of all ranks
        if not self.baseline or self.baseline_model or not (trainer.is_global_zero or sharded):
            return
        name, _, cache_dir = self._model_options(pl_module)
        key, evaluate = self._key(pl_module, name), lambda: self.evaluate_model(pl_module.model, pl_module.tokenizer)
        if not sharded:
            self._dense = self._timed(pl_module, cached_baseline(key, evaluate, cache_dir))
            return
        # rank 0's cache decides; then every rank evaluates (the same chunks), rank 0 stores and keeps it
        dense = trainer.strategy.broadcast(read_baseline(key, cache_dir) if trainer.is_global_zero else None, src=0)
        dense = dense or measure_baseline(key, evaluate, cache_dir, store=trainer.is_global_zero)
        if trainer.is_global_zero:
            self._dense = self._timed(pl_module, dense)

    def _timed(self, pl_module: LightningModule, dense: dict) -> dict:
        """The time a measured (not cached) baseline took goes into the report's stages."""
        if not dense["cached"]:
            pl_module.report.record("seconds", {f"baseline_{self.kind}": dense["seconds"]})
        return dense

    # -- at evaluation time ---------------------------------------------------------------------
    def dense_baseline(self, trainer: Trainer, pl_module: LightningModule, stage: str, results: dict) -> dict | None:
        """The dense entry of the report for the evaluated model's ``results`` (``None``: baseline off)."""
        if not self.baseline:
            return None
        if self._dense is not None:
            dense, self._dense = self._dense, None
            return dense
        name, _, cache_dir = self._model_options(pl_module)
        reference = self.baseline_model or dense_reference(name)
        if reference is None:
            reason = (f"{name} is a pruned model whose report.json does not name the model it was pruned from; "
                      f"set {type(self).__name__}.baseline_model")
            log.warning("no dense %s baseline: %s", self.kind, reason)
            return {"skipped": reason}
        unchanged = getattr(pl_module, "pruning_plan", None) is None and (stage != "fit" or trainer.global_step == 0)
        if unchanged and model_identity(reference) == model_identity(name):
            key = self._key(pl_module, name)
            path = store_baseline(key, results, None, cache_dir)
            return {"model": key["model"], "results": results, "cached": False, "same_model": True, "cache_file": str(path)}

        def evaluate_reference() -> dict:
            log.info("measuring the dense %s baseline of %s", self.kind, reference)
            model, tokenizer = load_causal_lm(reference, cache_dir, self._model_options(pl_module)[1])
            try:
                device = next(pl_module.model.parameters()).device
                return self.evaluate_model(model.to(device), tokenizer)
            finally:
                del model
                gc.collect()

        return self._timed(pl_module, cached_baseline(self._key(pl_module, reference), evaluate_reference, cache_dir))
