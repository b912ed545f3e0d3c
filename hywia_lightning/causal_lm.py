"""A Hugging Face causal language model as a LightningModule.

It is what the pipeline's callbacks prune, refit and export. On its own it does not train:
a pruning-only job runs ``fit`` with ``max_steps: 0`` and lets the callbacks do the work.
"""

from __future__ import annotations

from lightning import LightningModule
from torch import Tensor

from .lm_loss import language_model_loss
from .models import load_causal_lm, resolve_model_path
from .report import RunReport


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

    def forward(self, input_ids: Tensor, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = language_model_loss(self.model, batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return None  # pruning-only jobs change weights in callbacks, not by gradient steps
