"""HyWIA pruning, the convenient way: :class:`StructuredPruning` with a :class:`~hywia_lightning.HyWIA` scorer.

    - class_path: callbacks.HybridPruning
      init_args: {target_ratio: 0.2, schemes: [element1, element2, vector], mode: heuristic}

is the same job as ``callbacks.StructuredPruning`` with ``granularity: {class_path:
hywia_lightning.HyWIA, init_args: {schemes: ..., mode: ...}}``. Every other key is
:class:`StructuredPruning`'s.
"""

from __future__ import annotations

from typing import Literal

from hywia_lightning.granularities import Granularity
from hywia_lightning.hywia import FusionMode, FusionTrainingArgs, HyWIA

from .pruning import StructuredPruning


class HybridPruning(StructuredPruning):
    def __init__(
        self,
        target_ratio: float,
        schemes: list[str | Granularity] = ["element1", "element2", "vector"],
        mode: FusionMode = "heuristic",
        weights: dict[str, float] | None = None,
        sharpness: float = 4.0,
        training: FusionTrainingArgs | None = None,
        normalization: Literal["group", "kind"] = "group",
        **kwargs,
    ) -> None:
        """
        Args:
            schemes, mode, weights, sharpness, training, normalization: the :class:`~hywia_lightning.HyWIA` scorer's.
            kwargs: :class:`StructuredPruning`'s keys (all but ``granularity``).
        """
        scorer = HyWIA(schemes, mode, weights, sharpness, training, normalization, seed=kwargs.get("seed", 0))
        super().__init__(target_ratio, granularity=scorer, **kwargs)
