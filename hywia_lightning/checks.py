"""The range check of library functions' counts; classes that YAML builds use jsonargparse's typed
parameters instead (``PositiveInt``), so LightningCLI reports a bad value with its key."""

from __future__ import annotations


def require_positive(**counts: int | None) -> None:
    """Refuse a count below 1 (``None`` means "all" and passes), naming its argument."""
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{key}={value} must be at least 1")
