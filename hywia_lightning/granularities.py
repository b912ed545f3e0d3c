"""Granularities: callables from a unit group to one importance score per unit.

Fine-grained scores sum element-wise Taylor terms over a unit (LLM-Pruner's Element¹/Element²);
the coarse-grained score takes the Taylor term of the whole unit vector (Vector). Magnitude and
random are the baselines. A new scheme subclasses :class:`Granularity` and implements ``__call__``
(see docs/extending.md and callbacks/wanda.py).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .unit_groups import UnitGroup


class Granularity:
    """Score every unit of a group; higher means more important (kept first)."""

    #: Whether scores need the statistics of an estimation pass (gradients, input norms).
    needs_statistics: bool = True
    #: ``"fine"`` (element-wise), ``"coarse"`` (vector/group-wise) or ``None``: how the heuristic
    #: fusion weighs the scheme along depth (front layers fine, back layers coarse).
    grain: str | None = None

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def __call__(self, group: UnitGroup) -> Tensor:  # [num_units]
        raise NotImplementedError


def _require_gradients(group: UnitGroup, name: str) -> None:
    if group.grads is None or group.sq_grads is None:
        raise ValueError(f"granularity {name!r} needs gradient statistics, but {group.name} has none")


class Random(Granularity):
    """Seeded uniform scores: the floor every real criterion must beat."""

    needs_statistics = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, group: UnitGroup) -> Tensor:
        digest = hashlib.sha256(f"{self.seed}:{group.name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(group.num_units, generator=generator, dtype=torch.float64)


class Magnitude(Granularity):
    """Squared L2 norm of everything the unit owns."""

    needs_statistics = False

    def __call__(self, group: UnitGroup) -> Tensor:
        return sum(w.double().pow(2).sum(1) for w in group.weights)


class Element1(Granularity):
    """First-order element-wise Taylor: Σ |w·g|."""

    grain = "fine"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require_gradients(group, self.name)
        return sum((w.double() * g.double()).abs().sum(1) for w, g in zip(group.weights, group.grads))


class Element2(Granularity):
    """Second-order element-wise Taylor with the diagonal Fisher: Σ |w·g − ½·w²·F|."""

    grain = "fine"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require_gradients(group, self.name)
        return sum(
            (w.double() * g.double() - 0.5 * w.double().pow(2) * f.double()).abs().sum(1)
            for w, g, f in zip(group.weights, group.grads, group.sq_grads)
        )


class Vector(Granularity):
    """Coarse-grained (vector-wise) Taylor over the whole coupled unit: |Σ w·g|."""

    grain = "coarse"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require_gradients(group, self.name)
        return sum((w.double() * g.double()).sum(1) for w, g in zip(group.weights, group.grads)).abs()


GRANULARITIES: dict[str, type[Granularity]] = {
    "random": Random,
    "magnitude": Magnitude,
    "element1": Element1,
    "element2": Element2,
    "vector": Vector,
}


def make_granularity(spec: str | Granularity, seed: int = 0) -> Granularity:
    """A granularity from its registered name, or the given instance itself."""
    if isinstance(spec, Granularity):
        return spec
    if spec not in GRANULARITIES:
        raise ValueError(
            f"granularity={spec!r} is unknown; allowed: {', '.join(GRANULARITIES)}, "
            "or a Granularity subclass given by class_path"
        )
    return Random(seed) if spec == "random" else GRANULARITIES[spec]()


def check_scores(scores: Tensor, group: UnitGroup, granularity: Granularity) -> Tensor:
    """Refuse scores that would silently corrupt a plan: wrong shape, NaN or infinity."""
    if not isinstance(scores, Tensor) or scores.shape != (group.num_units,):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(
            f"granularity {granularity.name!r} returned {shape} for {group.name}; expected ({group.num_units},)"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"granularity {granularity.name!r} returned NaN or infinite scores for {group.name}")
    return scores
