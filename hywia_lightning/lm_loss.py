"""The calibration objective every stage shares: next-token loss of a model on token windows."""

from __future__ import annotations

from torch import Tensor, nn


def language_model_loss(model: nn.Module, batch) -> Tensor:
    """Mean next-token cross-entropy of ``batch`` (token ids, or a 1-tuple of them from a TensorDataset)."""
    input_ids = batch[0] if isinstance(batch, (list, tuple)) else batch
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
