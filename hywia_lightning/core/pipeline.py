"""The pruning pipeline as one library call: estimate, score, allocate, select (:func:`prune`), and
as its two public steps: :func:`estimate` and :func:`plan_from_statistics`.

    layers = target_layers(model, 4, -2)
    result = prune(model, windows, HyWIA(...), PruningScope(0.2), GlobalAllocation(), layers)
    apply_plan(model, result.plan)

No Trainer is needed; the pruning callback adds only Lightning's concerns (when to run, resume,
ranks, hooks, the report). Under several processes pass a :class:`Collective`: each rank estimates
on its share of the windows, the statistics are summed (``g`` and ``g²`` into each rank's shard,
where the collective can shard), each group's scores come from its statistics gathered for it alone,
and rank 0's plan is what every rank gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..distributed.collective import Collective
from ..local_loop import LocalLoop
from .allocation import Allocation, PruningScope
from .distillation import DistillationSet
from .estimation import Estimator
from .estimation_loop import run_estimation
from .granularities import Granularity
from .importance_summary import importance_summary
from .plan import LayerWidths, PruningPlan, count_parameters, make_plan
from .scoring import Scored, ScoringContext
from .statistics import Statistics
from .structures import LayerStructures
from .unit_groups import GroupKey, output_projections, prunable_linears, unit_groups
from .width_search import WidthSearch, search_widths


def accumulator_shards(collective: Collective | None, shard_accumulators: bool | None) -> Collective | None:
    """The ranks ``g`` and ``g²`` are sharded over: all of them, unless ``shard_accumulators`` is
    false (``None``: whenever there are several and the collective can)."""
    if collective is None or collective.world_size == 1 or shard_accumulators is False:
        return None
    if not collective.can_shard:
        if shard_accumulators:
            raise ValueError("shard_accumulators=True needs a reduce-scatter and an all-gather between the ranks "
                             "(a torch.distributed process group); this run's collective has none")
        return None
    return collective


def estimate(
    model: nn.Module, layers: list[LayerStructures], windows: Tensor, needs: frozenset[str], attention_unit: str,
    accumulate_dtype: torch.dtype = torch.float32, batch_size: int = 1, collective: Collective | None = None,
    shard_accumulators: bool | None = None, loop: LocalLoop | None = None, checkpoint_every: int | None = None,
) -> Statistics:
    """The statistics ``needs`` asks for, over this rank's share of ``windows``, summed over ranks
    (see :func:`accumulator_shards` for ``shard_accumulators``), passed by Lightning's loop on this
    process (:func:`~hywia_lightning.core.estimation_loop.run_estimation`: ``loop``, ``checkpoint_every``)."""
    rank, world = (collective.rank, collective.world_size) if collective else (0, 1)
    sharded = accumulator_shards(collective, shard_accumulators)
    estimator = Estimator(model, prunable_linears(layers, attention_unit), needs, len(windows), accumulate_dtype,
                          batch_size, sharded, output_projections(layers, attention_unit))
    indices: list[int | None] = list(range(rank, len(windows), world))
    if sharded is not None:  # as many batches on every rank: each issues the same reduce-scatters
        indices += [None] * (-(-len(windows) // world) - len(indices))
    run_estimation(estimator, windows[[0 if i is None else i for i in indices]], indices, loop, checkpoint_every, collective)
    return estimator.statistics(collective.all_reduce if collective and world > 1 else None)


@dataclass
class PruneResult:
    plan: PruningPlan
    widths: dict[int, LayerWidths]
    scores: dict[GroupKey, Tensor]
    importance: dict   # score distributions per scheme and group (the report's "importance")
    record: dict       # what the granularity's scoring recorded (the HyWIA fusion's weights per group)
    seconds: dict[str, float]
    accumulator_bytes: int = 0  # g and g² this rank held after estimation (its shards when sharded)
    accumulator_shards: int = 1  # the ranks they were sharded over
    width_search: dict | None = None  # what the width search measured and chose (rank 0)
    by_scheme: dict | None = None  # each scheme's own scores where the scores blend several (Scored.by_scheme)


def prune(
    model: nn.Module,
    windows: Tensor | None,
    granularity: Granularity,
    scope: PruningScope,
    allocation: Allocation,
    layers: list[LayerStructures],
    accumulate_dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    collective: Collective | None = None,
    seed: int = 0,
    score: Callable[[list, ScoringContext], Scored | dict] | None = None,
    shard_accumulators: bool | None = None,
    width_search: WidthSearch | None = None,
    distillation: DistillationSet | None = None,
    loop: LocalLoop | None = None,
    checkpoint_every: int | None = None,
) -> PruneResult:
    """The plan for ``layers`` of ``model`` at ``scope``: nothing is sliced (see ``apply_plan``).

    ``score`` replaces ``granularity.score_groups`` (the pruning callback's override point); the
    statistics estimated are still the ones ``granularity.needs``. ``shard_accumulators``: see
    :func:`accumulator_shards`. ``width_search``: the allocation's widths are only the start of a
    search against the KL to the dense model on ``distillation``'s windows (rank 0 searches; its
    plan is every rank's). ``loop``: where estimation and a granularity that trains run their Trainers (a
    job's run folder and loggers; ``None``: on the model's device, writing nothing);
    ``checkpoint_every``: estimation batches between checkpoints of its sums (needs ``loop``'s run folder)."""
    start = time.perf_counter()
    statistics = None
    if granularity.needs:
        if windows is None:
            needs = ", ".join(sorted(granularity.needs))
            raise ValueError(f"granularity {granularity.name!r} needs calibration windows ({needs})")
        statistics = estimate(model, layers, windows, granularity.needs, scope.attention_unit, accumulate_dtype,
                              batch_size, collective, shard_accumulators, loop, checkpoint_every)
    estimation = time.perf_counter() - start
    result = plan_from_statistics(model, layers, windows, statistics, granularity, scope, allocation, collective, seed,
                                  score, width_search, distillation, loop)
    result.seconds = {"estimation": estimation, **result.seconds}
    return result


def plan_from_statistics(
    model: nn.Module, layers: list[LayerStructures], windows: Tensor | None, statistics: Statistics | None,
    granularity: Granularity, scope: PruningScope, allocation: Allocation, collective: Collective | None = None,
    seed: int = 0, score: Callable[[list, ScoringContext], Scored | dict] | None = None,
    width_search: WidthSearch | None = None, distillation: DistillationSet | None = None, loop: LocalLoop | None = None,
) -> PruneResult:
    """:func:`prune` after estimation: score the groups of ``statistics``, allocate the widths (and
    search them), select the units. A screen of many granularities on one estimation calls this per one
    (``scripts/sweep_variants.py``); the statistics are read, not consumed."""
    seconds = {}
    total = count_parameters(model)
    start = time.perf_counter()
    accumulators = (statistics.accumulator_bytes, statistics.accumulator_shards) if statistics else (0, 1)
    groups = unit_groups(layers, scope.attention_unit, model.config.num_hidden_layers, statistics)
    context = ScoringContext(model, layers, scope, windows, lambda s: allocation.widths(layers, total, scope, s), seed, loop)
    scored = (score or granularity.score_groups)(groups, context)
    scored = scored if isinstance(scored, Scored) else Scored(scored)  # a plain dict of scores from an override
    scores = scored.scores
    seconds["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    widths = allocation.widths(layers, total, scope, scores)
    seconds["pruning"] = time.perf_counter() - start
    searched = None
    if width_search is not None and (collective is None or collective.rank == 0):
        if windows is None or distillation is None:
            raise ValueError("width_search needs calibration windows (the candidates' refits) and a distillation set "
                             "(the KL it is judged by)")
        found = search_widths(model, layers, scope, scores, widths, windows, distillation, width_search, total)
        widths, searched = found.widths, found.record
        seconds["width_search"] = found.record["seconds"]
    start = time.perf_counter()
    plan = make_plan(layers, scores, widths, scope.attention_unit)
    if collective is not None and collective.world_size > 1:  # the summed statistics agree; rank 0's plan rules
        plan = PruningPlan.from_dict(collective.broadcast(plan.to_dict()))
    seconds["pruning"] += time.perf_counter() - start
    return PruneResult(plan, widths, scores, importance_summary(scored.distributions(granularity.name)), scored.record,
                       seconds, *accumulators, searched, scored.by_scheme)
