"""Granularities: callables from a unit group to one importance score per unit.

Each scheme declares the statistics it reads (``needs``, see :mod:`hywia_lightning.core.statistics`),
and estimation collects exactly those. Names follow LLM-Pruner's where it has one (docs/hywia.md
has every formula next to its name):

- fine-grained (element-wise Taylor): ``element1`` Σ|w·g|; ``element2`` Σ ½·w²·F, the diagonal
  Fisher (OBD) saliency, LLM-Pruner's Element² as its code runs it (``param_second``);
- coarse-grained (the whole unit vector): ``vector`` |Σ w·g|; ``vector2`` mean_j (Σ w·g_j)², the
  per-window group Fisher;
- activation-aware: ``wanda`` Σ |W|·‖X‖; ``fluctuation`` FLAP's WIFV, Σ_j var(X_j)·‖W_:,j‖² over
  the output projection's input columns a unit owns; ``obs`` the structured Optimal Brain Surgeon
  cost, what removing a unit costs after the least-squares refit compensates;
- baselines: ``magnitude``, ``random``.

A new scheme subclasses :class:`Granularity` and implements ``__call__`` (docs/extending.md).
"""

from __future__ import annotations

import hashlib
from abc import ABC
from typing import Literal

import torch
from torch import Tensor

from ..input_errors import did_you_mean
from .compensation import damped
from .scoring import Scored, ScoringContext
from .unit_groups import UnitGroup

Grain = Literal["fine", "coarse"] | None


class Granularity(ABC):
    """Scores the units of unit groups; higher means more important (kept first).

    A scheme implements :meth:`__call__` (one group's scores); a granularity that scores all groups
    jointly (the HyWIA fusion) implements :meth:`score_groups` instead. :meth:`check` is the
    optional hook that refuses settings before any heavy work."""

    #: The statistics the scores read (see :data:`hywia_lightning.core.statistics.NEEDS`).
    needs: frozenset[str] = frozenset()
    #: ``"fine"`` (element-wise), ``"coarse"`` (vector/group-wise) or ``None``: how the heuristic
    #: fusion weighs the scheme along depth (front layers fine, back layers coarse).
    grain: Grain = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__call__ is Granularity.__call__ and cls.score_groups is Granularity.score_groups:
            raise TypeError(f"{cls.__name__} must implement __call__(group) (one group's scores) or "
                            "score_groups(groups, context) (all groups jointly)")

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def __call__(self, group: UnitGroup) -> Tensor:  # [num_units]
        raise TypeError(f"granularity {self.name!r} scores all groups jointly: call score_groups(groups, context)")

    def score_groups(self, groups: list[UnitGroup], context: ScoringContext) -> Scored:
        """Scores of every group, keyed by :class:`~hywia_lightning.core.unit_groups.GroupKey`. The
        override point for schemes that score all groups jointly (the HyWIA fusion)."""
        return Scored({g.key: check_scores(self(g), g, self) for g in groups})

    def check(self, num_windows: int) -> None:
        """Optional hook: refuse settings that ``num_windows`` calibration windows cannot serve,
        before any heavy work (the pruning callback's preflight calls it). By default nothing."""


def _require(group: UnitGroup, name: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(group, f) is None]
    if missing:
        raise ValueError(f"granularity {name!r} needs {', '.join(missing)} from an estimation pass, but {group.name} has none")


class Random(Granularity):
    """Seeded uniform scores: the floor every real criterion must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, group: UnitGroup) -> Tensor:
        digest = hashlib.sha256(f"{self.seed}:{group.name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(group.num_units, generator=generator, dtype=torch.float64)


class Magnitude(Granularity):
    """Squared L2 norm of everything the unit owns."""

    def __call__(self, group: UnitGroup) -> Tensor:
        return sum(w.double().pow(2).sum(1) for w in group.weights)


class Element1(Granularity):
    """First-order element-wise Taylor: Σ |w·g| (LLM-Pruner's Element¹)."""

    needs = frozenset({"gradients"})
    grain = "fine"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "grads")
        return sum((w.double() * g.double()).abs().sum(1) for w, g in zip(group.weights, group.grads))


class Element2(Granularity):
    """Second-order element-wise Taylor from the diagonal Fisher (OBD): Σ ½·w²·F."""

    needs = frozenset({"squared_gradients"})
    grain = "fine"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "sq_grads")
        return sum(0.5 * (w.double().pow(2) * f.double()).sum(1) for w, f in zip(group.weights, group.sq_grads))


class Vector(Granularity):
    """Coarse-grained (vector-wise) first-order Taylor over the whole coupled unit: |Σ w·g|."""

    needs = frozenset({"gradients"})
    grain = "coarse"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "grads")
        return sum((w.double() * g.double()).sum(1) for w, g in zip(group.weights, group.grads)).abs()


class Vector2(Granularity):
    """Coarse-grained second order, the group Fisher: mean over windows j of (Σ_unit w·g_j)²."""

    needs = frozenset({"window_saliency"})
    grain = "coarse"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "window_saliency")
        return group.window_saliency.double().pow(2).mean(0)


class Wanda(Granularity):
    """Σ |W|·‖X‖ over everything a unit owns (Sun et al., 2023, made structured): a weight matters
    as much as its magnitude times the norm of the input feature it multiplies."""

    needs = frozenset({"input_moments"})
    grain = "fine"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "input_norms")
        return sum((w.double().abs() * n.double()).sum(1) for w, n in zip(group.weights, group.input_norms))


class Fluctuation(Granularity):
    """FLAP's weighted input feature variance (WIFV): Σ_j var(X_j)·‖W_:,j‖² over the output
    projection's input features that the unit is (An et al., 2024): a feature that barely varies
    is replaced by its mean (the bias compensation) at little cost."""

    needs = frozenset({"input_moments"})
    grain = "coarse"

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "input_variance")
        i = group.output_member
        return (group.weights[i].double().pow(2) * group.input_variance[i].double()).sum(1)


class OBS(Granularity):
    """Structured Optimal Brain Surgeon (as in SlimGPT, Ling et al., 2024): the output error a unit's
    removal costs when the remaining features and a bias compensate by least squares, which is what
    the refit does. For one feature ``j`` this is ``‖W_:,j‖² / [Σ⁻¹]_jj``: FLAP's fluctuation with
    the variance *given the other features* in place of the variance, so a feature the others predict
    is cheap to remove even when it fluctuates. Correlated features share that credit, so units are
    removed greedily, ``ceil(units / steps)`` at a time, each step re-pricing the rest after the
    compensation so far (the exact OBS update of ``W`` and ``Σ⁻¹``). A unit's score is the total
    error once it is gone (:func:`~hywia_lightning.core.compensation.compensated_error` of the units
    left): units removed later score higher, in the same units across layers.

    ``damping``: added to ``Σ``'s diagonal, relative to its mean (SparseGPT's 1%), so that ``Σ`` of
    a few thousand tokens can be inverted."""

    needs = frozenset({"input_moments", "output_gram"})
    grain = "coarse"

    def __init__(self, damping: float = 0.01, steps: int = 128) -> None:
        if not damping > 0 or steps < 1:
            raise ValueError(f"obs needs damping > 0 and steps >= 1; got damping={damping}, steps={steps}")
        self.damping, self.steps = damping, steps

    def __call__(self, group: UnitGroup) -> Tensor:
        _require(group, self.name, "output_covariance")
        units = group.num_units
        n = group.output_covariance.shape[0]
        weight = group.weights[group.output_member].double().reshape(n, -1).clone()  # [in, out]: Wᵀ
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(damped(group.output_covariance, self.damping)))
        columns = torch.arange(n).view(units, -1)  # unit u's input features
        alive = torch.ones(units, dtype=torch.bool)
        scores = torch.empty(units, dtype=torch.float64)
        error, per_step = 0.0, -(-units // self.steps)
        while alive.any():
            candidates = alive.nonzero().flatten()
            cost = self._removal_costs(weight, h_inv, columns[candidates])
            order = cost.argsort()[:per_step]
            removed = candidates[order]
            scores[removed] = error + cost[order]  # ≤ the joint cost below: scores rise with the removal order
            drop = columns[removed].flatten()
            block_inv = torch.linalg.inv(h_inv[drop][:, drop])
            error += float(((block_inv @ weight[drop]) * weight[drop]).sum())
            weight -= h_inv[:, drop] @ (block_inv @ weight[drop])  # the OBS update: the rest compensate
            h_inv.addmm_(h_inv[:, drop] @ block_inv, h_inv[drop, :], alpha=-1)
            alive[removed] = False
        return scores

    @staticmethod
    def _removal_costs(weight: Tensor, h_inv: Tensor, cols: Tensor) -> Tensor:
        """``tr(W_C ([Σ⁻¹]_CC)⁻¹ W_Cᵀ)`` for each unit's columns ``C`` (a row of ``cols``)."""
        if cols.shape[1] == 1:  # one feature per unit (MLP channels): no batch of 1×1 inverses
            c = cols[:, 0]
            return weight[c].pow(2).sum(1) / h_inv.diagonal()[c]
        blocks = torch.linalg.inv(h_inv[cols[:, :, None], cols[:, None, :]])  # [c, d, d]
        w = weight[cols]                                                        # [c, d, out]
        return ((blocks @ w) * w).sum((1, 2))


GRANULARITIES: dict[str, type[Granularity]] = {
    "random": Random,
    "magnitude": Magnitude,
    "element1": Element1,
    "element2": Element2,
    "vector": Vector,
    "vector2": Vector2,
    "wanda": Wanda,
    "fluctuation": Fluctuation,
    "obs": OBS,
}


def make_granularity(spec: str | Granularity, seed: int = 0, key: str = "granularity") -> Granularity:
    """A granularity from its registered name, or the given instance itself; ``key`` names the
    setting in a refusal (``schemes[1]`` inside a fusion)."""
    if isinstance(spec, Granularity):
        return spec
    if spec not in GRANULARITIES:
        close = did_you_mean(spec, GRANULARITIES)
        raise ValueError(f"{key}={unknown_granularity(spec)}{' (' + close + ')' if close else ''}")
    return Random(seed) if spec == "random" else GRANULARITIES[spec]()


def unknown_granularity(name: str) -> str:
    return f"{name!r} is unknown; allowed: {', '.join(GRANULARITIES)}, or a Granularity subclass given by class_path"


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
