"""A Hugging Face causal language model as a LightningModule.

It is what the pipeline's callbacks prune, refit and export. On its own it does not train:
a pruning-only job runs ``fit`` with ``max_steps: 0`` and lets the callbacks do the work.
``validate`` and ``test`` report the language-model loss and perplexity of the data's batches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from ..core.lm_loss import language_model_loss, scored_tokens
from ..report.run_report import RunReport
from .loading import load_causal_lm, resolve_model_path


class CausalLM(LightningModule):
    def __init__(self, model_name_or_path: str, cache_dir: str | None = None, dtype: str = "float32") -> None:
        """
        Args:
            model_name_or_path: a hub id, a local Hugging Face folder, or ``bundled:SmolLM2-135M-Instruct``.
            cache_dir: where the bundled model is converted once (default ``$HYWIA_CACHE`` or ``~/.cache/hywia_lightning``).
            dtype: weights dtype: ``float32``, ``bfloat16`` or ``float16``.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model, self.tokenizer = load_causal_lm(model_name_or_path, cache_dir, dtype)
        self.source_path = resolve_model_path(model_name_or_path, cache_dir)
        self.report = RunReport()
        # token-weighted mean loss, summed over ranks when computed: perplexity = exp(mean)
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def forward(self, input_ids: Tensor, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = language_model_loss(self.model, batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_model(self) -> None:
        """Nothing to parallelize: with ``pruning.shard_weights`` the pruning callback has sharded the
        model with FSDP2 in ``setup``. Defined because ``ModelParallelStrategy``, the strategy that
        takes such a model as it is, requires this hook."""

    def configure_optimizers(self):
        return None  # pruning-only jobs change weights in callbacks, not by gradient steps

    # -- validate / test ------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _evaluate(self, split: str, batch, loss: Tensor | None = None) -> None:
        """Fold the batch's language-model loss (``loss`` where the caller has computed it) into ``split``'s mean."""
        loss = language_model_loss(self.model, batch) if loss is None else loss
        self.eval_loss[split].update(loss.detach().float(), weight=scored_tokens(batch))

    def _log_evaluation(self, split: str) -> None:
        metric = self.eval_loss[split]
        if not metric.update_called:
            return
        loss = metric.compute()
        metric.reset()
        self.log(f"{split}_loss", loss, sync_dist=False)  # already summed over ranks by compute()
        self.log(f"{split}_ppl", torch.exp(loss), sync_dist=False)
        self.record_evaluation(split, loss.item())

    def record_evaluation(self, split: str, loss: float) -> None:
        """Keep the latest loss of ``split`` in the run's report (with the step it was taken at)."""
        self.report.record(f"{split}_language_model", {
            "loss": loss, "perplexity": math.exp(loss), "step": self.global_step,
        })

    # -- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hywia_report"] = self.report.sections

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.report.sections.update(checkpoint.get("hywia_report", {}))
