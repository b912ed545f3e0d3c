"""The pruning pipeline as one library call: estimate, score, allocate, select.

    layers = target_layers(model, 4, -2)
    result = prune(model, windows, HyWIA(...), PruningScope(0.2), GlobalAllocation(), layers)
    apply_plan(model, result.plan)

No Trainer is needed; the pruning callback adds only Lightning's concerns (when to run, resume,
ranks, hooks, the report). Under several processes pass a :class:`Collective`: each rank estimates
on its share of the windows, the statistics are summed, and rank 0's plan is what every rank gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .allocation import Allocation, PruningScope
from .estimation import Estimator
from .granularities import Granularity
from .importance_summary import importance_summary
from .plan import LayerWidths, PruningPlan, count_parameters, make_plan
from .scoring import ScoringContext
from .statistics import Statistics
from .structures import LayerStructures, discover_structures
from .unit_groups import GroupKey, prunable_linears, unit_groups


@dataclass
class Collective:
    """How ranks of a distributed run talk (a single process needs none)."""

    rank: int
    world_size: int
    all_reduce: Callable[[Tensor], Tensor]  # sum over ranks
    broadcast: Callable[[Any], Any]         # rank 0's object to every rank


def layer_range(num_layers: int, layer_start: int = 0, layer_end: int | None = None) -> range:
    """Layers ``[layer_start, layer_end)``; negatives count from the end, ``None`` is the last layer."""
    start = layer_start + num_layers if layer_start < 0 else layer_start
    end = num_layers if layer_end is None else layer_end + (num_layers if layer_end < 0 else 0)
    if not 0 <= start < end <= num_layers:
        raise ValueError(
            f"layer_start={layer_start}, layer_end={layer_end} select no valid range of the model's "
            f"{num_layers} layers; allowed: 0 <= layer_start < layer_end <= {num_layers} (negative counts from the end)"
        )
    return range(start, end)


def target_layers(model: nn.Module, layer_start: int = 0, layer_end: int | None = None) -> list[LayerStructures]:
    structures = discover_structures(model)
    return [structures[i] for i in layer_range(len(structures), layer_start, layer_end)]


def estimate(
    model: nn.Module, layers: list[LayerStructures], windows: Tensor, needs: frozenset[str], attention_unit: str,
    accumulate_dtype: torch.dtype = torch.float32, batch_size: int = 1, collective: Collective | None = None,
) -> Statistics:
    """The statistics ``needs`` asks for, over this rank's share of ``windows``, summed over ranks."""
    rank, world = (collective.rank, collective.world_size) if collective else (0, 1)
    estimator = Estimator(model, prunable_linears(layers, attention_unit), needs, len(windows), accumulate_dtype,
                          batch_size)
    indices = list(range(rank, len(windows), world))
    estimator.accumulate(windows[indices], indices)
    return estimator.statistics(collective.all_reduce if collective and world > 1 else None)


@dataclass
class PruneResult:
    plan: PruningPlan
    widths: dict[int, LayerWidths]
    scores: dict[GroupKey, Tensor]
    importance: dict   # score distributions per scheme and group (the report's "importance")
    scorer: dict       # what the scorer says about itself (the HyWIA fusion's weights)
    seconds: dict[str, float]


def prune(
    model: nn.Module,
    windows: Tensor | None,
    scorer: Granularity,
    scope: PruningScope,
    allocation: Allocation,
    layers: list[LayerStructures],
    accumulate_dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    collective: Collective | None = None,
    seed: int = 0,
    score: Callable[[list, ScoringContext], dict] | None = None,
) -> PruneResult:
    """The plan for ``layers`` of ``model`` at ``scope``: nothing is sliced (see ``apply_plan``).

    ``score`` replaces ``scorer.score_groups`` (the pruning callback's override point); the
    statistics estimated are still the ones ``scorer.needs``."""
    seconds = {}
    total = count_parameters(model)
    start = time.perf_counter()
    statistics = None
    if scorer.needs:
        if windows is None:
            raise ValueError(f"granularity {scorer.name!r} needs calibration windows ({', '.join(sorted(scorer.needs))})")
        statistics = estimate(model, layers, windows, scorer.needs, scope.attention_unit, accumulate_dtype,
                              batch_size, collective)
    seconds["estimation"] = time.perf_counter() - start
    start = time.perf_counter()
    groups = unit_groups(layers, scope.attention_unit, model.config.num_hidden_layers, statistics)
    del statistics
    context = ScoringContext(model, layers, scope, windows, lambda s: allocation.widths(layers, total, scope, s), seed)
    scores = (score or scorer.score_groups)(groups, context)
    seconds["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    widths = allocation.widths(layers, total, scope, scores)
    plan = make_plan(layers, scores, widths, scope.attention_unit)
    if collective is not None and collective.world_size > 1:  # the summed statistics agree; rank 0's plan rules
        plan = PruningPlan.from_dict(collective.broadcast(plan.to_dict()))
    seconds["pruning"] = time.perf_counter() - start
    return PruneResult(plan, widths, scores, importance_summary(scorer.distributions(scores)), scorer.describe(), seconds)
