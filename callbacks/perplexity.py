"""Perplexity of the fitted model at the end of ``fit``, into the run's report and logger."""

from __future__ import annotations

import logging

import torch
from lightning import Callback, LightningModule, Trainer

from hywia_lightning.perplexity import chunk_tokens, perplexity
from hywia_lightning.text_sources import check_source, read_text

from .preflight import Preflight, run_preflight

log = logging.getLogger(__name__)


class PerplexityEvaluation(Preflight, Callback):
    def __init__(
        self, source: str, seq_len: int = 128, num_chunks: int | None = 256, stride: int = 1, batch_size: int = 8,
        text_field: str = "text",
    ) -> None:
        """
        Args:
            source: evaluation text (a local file, ``builtin:python-docs/test``, or ``hub:<id>[:<config>]``).
            seq_len: tokens per non-overlapping chunk.
            num_chunks: evaluate the first this many chunks (``None``: the whole text).
            stride: take every ``stride``-th chunk.
        """
        for key, value in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{key}={value} must be at least 1")
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks} must be at least 1 (or null for the whole text)")
        self.source, self.seq_len, self.num_chunks, self.stride = source, seq_len, num_chunks, stride
        self.batch_size, self.text_field = batch_size, text_field
        self._chunks: torch.Tensor | None = None

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_source(self.source, "PerplexityEvaluation.source")
        self.chunks(pl_module.tokenizer)  # a text too short fails now, not after pruning

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_preflight(trainer, pl_module)

    def chunks(self, tokenizer) -> torch.Tensor:
        """The evaluation chunks (tokenized once)."""
        if self._chunks is None:
            text = read_text(self.source, "PerplexityEvaluation.source", self.text_field, split="test")
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            self._chunks = chunk_tokens(ids, self.seq_len, self.num_chunks, self.stride, f"PerplexityEvaluation.source={self.source!r}")
        return self._chunks

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        chunks = self.chunks(pl_module.tokenizer)
        with pl_module.report.stage("perplexity"):
            value = perplexity(pl_module.model, chunks, self.batch_size)
        pl_module.report.record("perplexity", {
            "source": self.source, "seq_len": self.seq_len, "chunks": chunks.shape[0],
            "tokens": chunks.numel(), "stride": self.stride, "value": value,
        })
        log.info("perplexity on %s (%d tokens): %.3f", self.source, chunks.numel(), value)
        for logger in trainer.loggers:
            logger.log_metrics({"perplexity": value}, step=trainer.global_step)
