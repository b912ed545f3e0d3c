"""What an estimation pass measures, as named data: the inputs every granularity reads.

A granularity declares the statistics it needs (:data:`NEEDS`); estimation collects exactly those,
and nothing at all for schemes that need none (magnitude, random).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..distributed.sharded_sums import Shard

#: ``gradients``: mean gradient ``g`` of every prunable parameter over the calibration windows.
#: ``squared_gradients``: mean per-window squared gradient (the diagonal empirical Fisher ``F``).
#: ``window_saliency``: per window ``j``, the Taylor term ``w·g_j`` summed over each output row and
#: over each input column of a weight (``[windows, out]`` and ``[windows, in]``), from which a unit's
#: per-window vector saliency is a sum (the group Fisher needs its square per window).
#: ``input_moments``: mean and mean square over calibration tokens of every input feature of a
#: prunable Linear (activation-aware schemes: Wanda's norms, FLAP's fluctuation; a forward pass only).
#: ``output_gram``: with ``input_moments``, the mean of ``x xᵀ`` over calibration tokens of the input
#: of every output projection (``o_proj``, ``down_proj``): the covariance of the features the units
#: write back, which a scheme needs to price what a least-squares refit can compensate (``obs``).
NEEDS = ("gradients", "squared_gradients", "window_saliency", "input_moments", "output_gram")
GRADIENT_NEEDS = frozenset(NEEDS[:3])  # the ones that need a backward pass


@dataclass
class ParameterStatistics:
    """Statistics of one prunable parameter; ``None`` where no granularity asked for them. Under
    sharded accumulators ``grad`` and ``sq_grad`` are this rank's
    :class:`~hywia_lightning.distributed.sharded_sums.Shard` (``sharded_sums.whole`` gathers one)."""

    grad: "Tensor | Shard | None" = None     # shape of the parameter
    sq_grad: "Tensor | Shard | None" = None  # shape of the parameter
    row_saliency: Tensor | None = None  # [windows, out]: Σ_in w·g_j per output row
    col_saliency: Tensor | None = None  # [windows, in]: Σ_out w·g_j per input column (weights only)


@dataclass
class InputStatistics:
    """Per input feature of one Linear, over all calibration tokens."""

    tokens: int
    mean: Tensor     # [in]
    sq_mean: Tensor  # [in]
    gram: Tensor | None = None  # [in, in]: mean of x xᵀ (output projections under ``output_gram``)

    @property
    def norm(self) -> Tensor:
        """L2 norm of each feature over the tokens (Wanda's ‖X_j‖)."""
        return (self.sq_mean * self.tokens).clamp_min(0).sqrt()

    @property
    def variance(self) -> Tensor:
        """Fluctuation of each feature around its mean over the tokens (FLAP's WIFV numerator)."""
        return (self.sq_mean - self.mean.pow(2)).clamp_min(0) * self.tokens / max(self.tokens - 1, 1)

    @property
    def covariance(self) -> Tensor | None:
        """``[in, in]`` covariance of the features around their means (``None`` without a Gram)."""
        if self.gram is None:
            return None
        return (self.gram - torch.outer(self.mean, self.mean)) * self.tokens / max(self.tokens - 1, 1)


@dataclass
class Statistics:
    """Everything one estimation pass measured."""

    windows: int
    parameters: dict[nn.Parameter, ParameterStatistics] = field(default_factory=dict)
    inputs: dict[nn.Linear, InputStatistics] = field(default_factory=dict)
    accumulator_bytes: int = 0  # of g and g² on this rank at the end of the pass (its shards when sharded)
    accumulator_shards: int = 1  # the ranks g and g² are sharded over (1: whole sums)


def check_needs(needs: set[str] | frozenset[str], who: str) -> frozenset[str]:
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"{who} needs unknown statistics {sorted(unknown)}; allowed: {', '.join(NEEDS)}")
    return frozenset(needs)
