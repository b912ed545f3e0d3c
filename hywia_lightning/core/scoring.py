"""What a scorer may read besides the unit groups: the model, the windows, the allocation, and
where a scorer that trains runs its Trainer."""

from __future__ import annotations

from dataclasses import dataclass
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

    ``widths(scores)`` is the plan's allocation at the target for the given scores: a scorer
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
