"""Perplexity on fixed, non-overlapping chunks of a tokenized text (torchmetrics)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from ..progress import Progress


def chunk_tokens(
    token_ids: Tensor, seq_len: int, num_chunks: int | None, stride: int = 1, source: str = "the evaluation text"
) -> Tensor:
    """``[n, seq_len]`` chunks: every ``stride``-th chunk, the first ``num_chunks`` of them (all if None)."""
    chunks = token_ids[: token_ids.numel() // seq_len * seq_len].reshape(-1, seq_len)[::stride]
    if num_chunks is not None:
        if chunks.shape[0] < num_chunks:
            raise ValueError(
                f"{source} has {chunks.shape[0]} chunks of {seq_len} tokens (stride {stride}), fewer than "
                f"num_chunks={num_chunks}; lower num_chunks or use a longer text"
            )
        chunks = chunks[:num_chunks]
    return chunks


@torch.no_grad()
def perplexity(model: nn.Module, chunks: Tensor, batch_size: int = 8) -> float:
    """Exp of the mean next-token loss over every predicted token of ``chunks``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metric = Perplexity(sync_on_compute=False).to(device)  # one process evaluates; no collective
    progress = Progress("perplexity", len(chunks), unit="chunk")
    try:
        for batch in chunks.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            metric.update(logits, batch[:, 1:])
            progress.update(len(batch))
    finally:
        progress.close()
        model.train(was_training)
    return metric.compute().item()
