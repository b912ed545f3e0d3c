"""Perplexity at the end of ``fit``, ``validate`` and ``test``, next to the dense model's (cached),
into the run's report and logger."""

from __future__ import annotations

import logging
import time

import torch
from lightning import Callback, LightningModule, Trainer

from hywia_lightning.baseline import file_fingerprint
from hywia_lightning.perplexity import chunk_tokens, perplexity
from hywia_lightning.progress import show_info_logs
from hywia_lightning.text_sources import check_source, read_text, token_ids

from .dense_baseline import DenseBaseline
from .preflight import Preflight, run_preflight
from .stage_end import StageEnd

log = logging.getLogger(__name__)


class PerplexityEvaluation(StageEnd, DenseBaseline, Preflight, Callback):
    kind = "perplexity"

    def __init__(
        self, source: str, seq_len: int = 128, num_chunks: int | None = 256, stride: int = 1, batch_size: int = 8,
        text_field: str = "text", baseline: bool = True, baseline_model: str | None = None,
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
        for key, value in (("seq_len", seq_len), ("stride", stride), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{key}={value} must be at least 1")
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks} must be at least 1 (or null for the whole text)")
        self.source, self.seq_len, self.num_chunks, self.stride = source, seq_len, num_chunks, stride
        self.batch_size, self.text_field = batch_size, text_field
        self.baseline, self.baseline_model = baseline, baseline_model
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
            ids = token_ids(tokenizer, text)
            self._chunks = chunk_tokens(ids, self.seq_len, self.num_chunks, self.stride, f"PerplexityEvaluation.source={self.source!r}")
        return self._chunks

    # -- DenseBaseline --------------------------------------------------------------------------
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

    # -- StageEnd -------------------------------------------------------------------------------
    def at_stage_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        chunks = self.chunks(pl_module.tokenizer)
        with pl_module.report.stage("perplexity"):
            value = self.evaluate_model(pl_module.model, pl_module.tokenizer)["value"]
        pl_module.report.record("perplexity", {
            "source": self.source, "seq_len": self.seq_len, "chunks": chunks.shape[0],
            "tokens": chunks.numel(), "stride": self.stride, "value": value,
        })
        metrics = {"perplexity": value}
        dense = self.dense_baseline(trainer, pl_module, stage, {"value": value})
        if dense is not None:
            pl_module.report.record("baseline", {"perplexity": dense})
            if "results" in dense:
                metrics["dense/perplexity"] = dense["results"]["value"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
