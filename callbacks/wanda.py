"""Wanda-style activation-aware importance, added the way users add a scheme: one class here,
named in YAML by ``class_path`` (see docs/extending.md)::

    schemes: [element1, element2, vector, {class_path: callbacks.wanda.WandaActivation}]
"""

from __future__ import annotations

from torch import Tensor

from hywia_lightning.granularities import Granularity
from hywia_lightning.unit_groups import UnitGroup


class WandaActivation(Granularity):
    """Σ |W|·‖X‖ over everything a unit owns (Sun et al., 2023, made structured): a weight matters
    as much as its magnitude times the norm of the input feature it multiplies."""

    grain = "fine"

    def __call__(self, group: UnitGroup) -> Tensor:
        if group.input_norms is None:
            raise ValueError(f"{self.name} needs the input norms of an estimation pass, but {group.name} has none")
        return sum((w.double().abs() * n.double()).sum(1) for w, n in zip(group.weights, group.input_norms))
