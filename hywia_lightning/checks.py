"""The range check of library functions' counts; classes that YAML builds use jsonargparse's typed
parameters instead (``PositiveInt``), so LightningCLI reports a bad value with its key."""

from __future__ import annotations


def require_positive(**counts: int | None) -> None:
    """Refuse a count below 1 (``None`` means "all" and passes), naming its argument."""
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{key}={value} must be at least 1")


def check_context(seq_len: int, model_config, key: str) -> None:
    """Refuse windows longer than the model's context (its ``max_position_embeddings``)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{key}={seq_len} is longer than the model's context (max_position_embeddings={limit}); "
                         f"allowed: 1..{limit}")
