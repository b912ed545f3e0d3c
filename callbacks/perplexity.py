"""Perplexity at the end of ``fit``, ``validate`` and ``test``, next to the dense model's (cached),
into the run's report and logger."""

from __future__ import annotations

import logging
import time

import torch
from jsonargparse.typing import PositiveInt
from lightning import LightningModule, Trainer

from hywia_lightning.checks import check_context
from hywia_lightning.data.text_sources import check_source, read_text, token_ids
from hywia_lightning.evaluation.baseline import file_fingerprint
from hywia_lightning.evaluation.perplexity import chunk_tokens, perplexity
from hywia_lightning.progress import show_info_logs

from .evaluation import Evaluation

log = logging.getLogger(__name__)


class PerplexityEvaluation(Evaluation):
    kind = "perplexity"

    def __init__(
        self, source: str, seq_len: PositiveInt = 128, num_chunks: PositiveInt | None = 256, stride: PositiveInt = 1,
        batch_size: PositiveInt = 8, text_field: str = "text", baseline: bool = True, baseline_model: str | None = None,
    ) -> None:
        """
        Args:
            source: evaluation text (a local file, ``builtin:python-docs/test``, or ``hub:<id>[:<config>]``).
            seq_len: tokens per non-overlapping chunk.
            num_chunks: evaluate the first this many chunks (``None``: the whole text).
            stride: take every ``stride``-th chunk.
            baseline: also report the dense model's perplexity on the same chunks (measured once, cached).
            baseline_model: the dense model to compare with; ``None``: the job's model before pruning,
                or the model a pruned export was made from (its ``report.json``).
        """
        super().__init__(baseline, baseline_model)
        self.source, self.seq_len, self.num_chunks, self.stride = source, seq_len, num_chunks, stride
        self.batch_size, self.text_field = batch_size, text_field
        self._chunks: torch.Tensor | None = None

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_source(self.source, self.setting("source"))
        check_context(self.seq_len, pl_module.model.config, self.setting("seq_len"))
        self.chunks(pl_module.tokenizer)  # a text too short fails now, not after pruning

    def chunks(self, tokenizer) -> torch.Tensor:
        """The evaluation chunks (tokenized once)."""
        if self._chunks is None:
            text = read_text(self.source, "PerplexityEvaluation.source", self.text_field, split="test")
            ids = token_ids(tokenizer, text)
            self._chunks = chunk_tokens(ids, self.seq_len, self.num_chunks, self.stride, f"PerplexityEvaluation.source={self.source!r}")
        return self._chunks

    # -- Evaluation -----------------------------------------------------------------------------
    def settings(self) -> dict:
        return {
            "source": self.source, "source_file": file_fingerprint(self.source), "text_field": self.text_field,
            "seq_len": self.seq_len, "num_chunks": self.num_chunks, "stride": self.stride,
        }

    def evaluate_model(self, model, tokenizer) -> dict:
        chunks = self.chunks(tokenizer)
        show_info_logs()
        log.info("perplexity: %d chunks of %d tokens, batch size %d ...", chunks.shape[0], self.seq_len, self.batch_size)
        start = time.perf_counter()
        value = perplexity(model, chunks, self.batch_size)
        seconds = time.perf_counter() - start
        log.info("perplexity on %s: %.3f (%d chunks in %.1fs, %.2f chunks/s, %.0f tokens/s)", self.source, value,
                 chunks.shape[0], seconds, chunks.shape[0] / seconds, chunks.numel() / seconds)
        return {"value": value}

    def section(self, results: dict) -> dict:
        chunks = self._chunks
        return {"source": self.source, "seq_len": self.seq_len, "chunks": chunks.shape[0], "tokens": chunks.numel(),
                "stride": self.stride, "value": results["value"]}

    def metrics(self, prefix: str, results: dict) -> dict[str, float]:
        return {prefix: results["value"]}
