"""Compact distributions of importance scores, per group and granularity, for the report.

The scores themselves (one per head or channel of every layer) are too many to keep; a few
quantiles per group show how each granularity spreads its scores over depth, which is what the
fusion attention reads and what the plot of importance distributions draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def quantiles(scores: Tensor, digits: int = 6) -> list[float]:
    values = torch.quantile(scores.detach().double().flatten().cpu(), torch.tensor(QUANTILES, dtype=torch.float64))
    return [float(f"{v:.{digits}g}") for v in values.tolist()]


def importance_summary(scores: dict[str, dict[str, Tensor]]) -> dict:
    """``{granularity: {group: scores}}`` → ``{"quantiles": [...], "schemes": [...], "groups": {group:
    {granularity: [q0, ..., q1]}}}``, groups in the order given."""
    schemes = list(scores)
    groups: dict[str, dict[str, list[float]]] = {}
    for scheme, per_group in scores.items():
        for group, values in per_group.items():
            groups.setdefault(group, {})[scheme] = quantiles(values)
    return {"quantiles": list(QUANTILES), "schemes": schemes, "groups": groups}
