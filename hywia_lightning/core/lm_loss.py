"""The objective every stage shares: next-token loss of a model on token windows or labelled examples."""

from __future__ import annotations

from torch import Tensor, nn

IGNORE_INDEX = -100  # label of tokens that are not scored (prompts, padding)


def language_model_loss(model: nn.Module, batch) -> Tensor:
    """Mean next-token cross-entropy over the scored tokens of ``batch``.

    ``batch``: token ids, a 1-tuple of them from a TensorDataset (every token scored), or a dict
    with ``input_ids``, ``labels`` (``IGNORE_INDEX`` where not scored) and ``attention_mask``.
    """
    if isinstance(batch, dict):
        return model(**batch, use_cache=False).loss
    input_ids = batch[0] if isinstance(batch, (list, tuple)) else batch
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def scored_tokens(batch) -> int:
    """How many next-token predictions :func:`language_model_loss` averages over."""
    if isinstance(batch, dict):
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    input_ids = batch[0] if isinstance(batch, (list, tuple)) else batch
    return input_ids.shape[0] * (input_ids.shape[1] - 1)
