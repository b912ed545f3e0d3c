"""What a granularity may read besides the unit groups (the model, the windows, the allocation,
and where a granularity that trains runs its Trainer), and what its scoring returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn

from .allocation import PruningScope
from .plan import LayerWidths
from .structures import LayerStructures
from .unit_groups import GroupKey

if TYPE_CHECKING:
    from ..local_loop import LocalLoop


@dataclass
class ScoringContext:
    """Handed to :meth:`Granularity.score_groups`; single-group schemes ignore it.

    ``widths(scores)`` is the plan's allocation at the target for the given scores: a granularity
    that learns (the HyWIA fusion) trains against the widths the plan will have, with a Trainer of
    ``loop`` (``None``: on the model's device, writing nothing).
    """

    model: nn.Module
    layers: list[LayerStructures]
    scope: PruningScope
    windows: Tensor
    widths: Callable[[dict[GroupKey, Tensor]], dict[int, LayerWidths]]
    seed: int = 0
    loop: "LocalLoop | None" = None


@dataclass
class Scored:
    """What :meth:`Granularity.score_groups` returns: one score per unit of every group, and what the
    report keeps of how they were made."""

    scores: dict[GroupKey, Tensor]
    record: dict = field(default_factory=dict)
    """What the report records about the scoring (the HyWIA fusion's weights per group); empty for one scheme."""
    by_scheme: dict[str, dict[str, Tensor]] | None = None
    """``{scheme: {group name: scores}}`` for the report's importance plot, where the scores are a
    blend of several schemes; ``None``: the scores themselves, under the granularity's name."""

    def distributions(self, name: str) -> dict[str, dict[str, Tensor]]:
        return self.by_scheme if self.by_scheme is not None else {name: {str(k): v for k, v in self.scores.items()}}
