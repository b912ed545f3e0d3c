"""Adaptive per-layer widths, chosen against the distillation KL to the dense model.

Uniform widths give every layer the same share of the cut, although layers differ in how much
their heads and channels matter to the model's output. This search measures it, coarse to fine:

1. Every pruned structure (a layer's attention, a layer's MLP) gets a few candidate widths. A
   candidate keeps the structure's highest-scoring units (the fused scores) and its output
   projection is refit by least squares from the dense model's moments on the calibration windows
   (with an intercept, anchored on the kept weights): the same kind of layer the pipeline's refit
   makes, applied by masking, not slicing (zeroed input columns of ``o_proj``/``down_proj`` are the
   sliced layer exactly).
2. Around the current widths (first round: the allocation's, e.g. uniform), each structure in turn
   is moved to each of its candidates while every other structure stays as it is, and the mean
   KL(p_dense ‖ q) over the first ``search_windows`` distillation windows is measured, from that
   layer's cached inputs onward. That gives each structure a curve: KL against parameters removed.
   (Proposals are judged on the first ``judge_windows``; the remaining distillation windows are
   never seen by the search, so the KL reported on them is not the one it was selected on.)
3. Along the curves' lower convex hulls, units are traded from the structures that cost least KL
   per parameter to those where they save most, while a trade gains, at the target's parameter
   count (the Lagrangian optimum of the sum of the curves; a structure may lose all its units).
4. The proposal is judged end to end and kept only if its KL is below the best so far. The curves
   add up only for small moves (removing many layers' attention at once costs more than the sum of
   removing each), so a rejected proposal is retried with half the parameters moved, the most
   profitable trades first, and an accepted one is followed by the next trades on the same curves
   (``judgements`` proposals per round). The next round measures one step either side of the best,
   the step halved.

What it costs is ``rounds × structures × candidates`` partial forward passes of ``search_windows``
windows, plus one full pass per round; what it holds are the dense moments of every pruned output
projection (``X Xᵀ`` and ``Σ X``, float64) and the KL windows' hidden states at every pruned layer.
Nothing is chosen on an evaluation set: the distillation windows are held-out calibration windows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor, nn

from ..progress import Progress
from ..reconstruction.layer_stream import LayerStream
from ..reconstruction.least_squares import RefitStatistics, dense_grams, solve_refit
from ..reconstruction.modes import output_projection
from .allocation import PruningScope
from .distillation import DistillationSet, PartialKL
from .plan import (
    TOLERANCE, LayerWidths, allowed_head_counts, channel_params, head_params, kept_output_columns, kv_head_params,
)
from .structures import LayerStructures
from .unit_groups import GroupKey

log = logging.getLogger(__name__)


@dataclass
class WidthSearch:
    """The search's keys (a pruning job's ``width_search`` group)."""

    levels: PositiveInt = 4
    """Candidate widths per structure in the first round: evenly spaced from none to all units."""
    rounds: PositiveInt = 2
    """Coarse to fine: each later round measures one step either side of the best, at half the step."""
    search_windows: PositiveInt = 8
    """Distillation windows each candidate is measured on (the first ones)."""
    damping: float = 0.1
    """The candidates' refit damping, relative to the mean diagonal of ``X Xᵀ`` (toward the kept weights)."""
    batch_size: PositiveInt = 8
    """Windows per call of a layer."""
    judgements: PositiveInt = 6
    """Proposals judged per round (one forward pass of the judge windows each): a rejected proposal
    is retried with half the parameters moved, an accepted one is followed by the next trades."""
    judge_windows: PositiveInt = 16
    """Distillation windows proposals are judged on (the first ones); the rest are never seen by the
    search, so the report's KL on them is not one the search was selected on."""

    def __post_init__(self) -> None:
        if not self.damping > 0:
            raise ValueError(f"width_search.damping={self.damping} must be > 0 (it keeps each candidate's refit solvable)")


@dataclass
class _Structure:
    """One searchable structure: its kept-count options (ascending) and the parameters each keeps."""

    key: GroupKey
    layer: LayerStructures
    options: list[int]      # kept counts allowed (query heads, or channels), ascending
    params: list[int]       # parameters kept at each option

    def __post_init__(self) -> None:
        self._params = dict(zip(self.options, self.params))

    def cost(self, count: int) -> int:
        """Parameters the structure keeps at ``count`` units."""
        return self._params[count]


def _structures(layers: list[LayerStructures], scope: PruningScope) -> list[_Structure]:
    found = []
    for s in layers:
        if scope.attention_unit != "none" and scope.heads_to_keep is None:
            a = s.attention
            counts = allowed_head_counts(a, scope.attention_unit)
            found.append(_Structure(GroupKey(s.layer, "attention"), s, [h for h, _ in counts],
                                    [h * head_params(a) + kv * kv_head_params(a) for h, kv in counts]))
        n, per_channel = s.mlp.num_channels, channel_params(s.mlp)
        options = sorted({*range(0, n, scope.round_to), n})
        found.append(_Structure(GroupKey(s.layer, "mlp"), s, options, [c * per_channel for c in options]))
    return found


def _kv_heads(s: LayerStructures, heads: int, scope: PruningScope) -> int:
    return next(kv for h, kv in allowed_head_counts(s.attention, scope.attention_unit) if h == heads)


def _widths(state: dict[GroupKey, int], start: dict[int, LayerWidths], scope: PruningScope,
            layers: list[LayerStructures]) -> dict[int, LayerWidths]:
    widths = {}
    for s in layers:
        w = start[s.layer]
        heads, kv = w.num_heads, w.num_kv_heads
        if GroupKey(s.layer, "attention") in state:
            heads = state[GroupKey(s.layer, "attention")]
            kv = _kv_heads(s, heads, scope)
        widths[s.layer] = LayerWidths(heads, kv, state.get(GroupKey(s.layer, "mlp"), w.num_channels))
    return widths


class _MaskedModel:
    """Puts candidate structures into the dense model by masking its output projections."""

    def __init__(self, model: nn.Module, structures: list[_Structure], scores: dict[GroupKey, Tensor],
                 scope: PruningScope, windows: Tensor, damping: float, batch_size: int) -> None:
        self.scores, self.scope, self.damping = scores, scope, damping
        self.by_key = {s.key: s for s in structures}
        self.projection = {s.key: output_projection(s.layer, s.key.kind) for s in structures}
        self.dense = {key: p.weight.data for key, p in self.projection.items()}
        self.hooks: dict[GroupKey, object] = {}
        self.current: dict[GroupKey, int] = {}
        self.cache: dict[tuple[GroupKey, int], tuple[Tensor, Tensor]] = {}
        self.moments = self._dense_moments(model, windows, batch_size)

    def _dense_moments(self, model, windows, batch_size) -> dict[GroupKey, RefitStatistics]:
        """``X Xᵀ`` and ``Σ X`` of every searched projection's input in the dense model."""
        layers = sorted({key.layer for key in self.projection})
        stream = LayerStream(model, windows, layers[0], layers[-1], batch_size)
        moments = {}
        while stream.next <= layers[-1]:
            projections = {key: p for key, p in self.projection.items() if key.layer == stream.next}
            grams, sums = dense_grams(projections, stream.advance)
            moments.update({key: (grams[key], sums[key]) for key in projections})
        tokens = windows.numel()
        return {key: (gram, total, tokens) for key, (gram, total) in moments.items()}

    def candidate(self, key: GroupKey, count: int, keep: bool = True) -> tuple[Tensor, Tensor] | None:
        """The masked output weight and bias of ``key`` keeping ``count`` units; ``None``: dense."""
        structure = self.by_key[key]
        if count == structure.options[-1]:
            return None
        if (key, count) in self.cache:
            return self.cache[(key, count)]
        s, dense = structure.layer, self.dense[key]
        w = LayerWidths(count, _kv_heads(s, count, self.scope), 0) if key.kind == "attention" else LayerWidths(0, 0, count)
        kept = kept_output_columns(key, self.scores[key], s, w, self.scope.attention_unit)
        gram, total, tokens = self.moments[key]
        stats = RefitStatistics.from_dense_gram(gram, total, kept, tokens)
        result = solve_refit(dense, dense[:, kept], stats, self.damping, str(key), intercept=True, prior="original")
        weight = torch.zeros_like(dense)
        weight[:, kept] = result.weight.to(dense.dtype)
        found = (weight, result.bias.to(dense.dtype))
        if keep:
            self.cache[(key, count)] = found
        return found

    def put(self, key: GroupKey, count: int, keep: bool = True) -> None:
        """Structure ``key`` keeps ``count`` units; ``keep``: cache its refit (a state is put again)."""
        if self.current.get(key) == count:
            return
        projection = self.projection[key]
        if key in self.hooks:
            self.hooks.pop(key).remove()
        found = self.candidate(key, count, keep)
        if found is None:
            projection.weight.data = self.dense[key]
        else:
            weight, bias = found
            projection.weight.data = weight
            self.hooks[key] = projection.register_forward_hook(lambda module, args, output, b=bias: output + b)
        self.current[key] = count

    def put_all(self, state: dict[GroupKey, int]) -> None:
        for key, count in state.items():
            self.put(key, count)

    def forget(self, keep: dict[GroupKey, int]) -> None:
        """Drop cached candidates other than ``keep``'s (each round measures new ones)."""
        self.cache = {k: v for k, v in self.cache.items() if keep.get(k[0]) == k[1]}

    def restore(self) -> None:
        """The dense model again."""
        for key in list(self.projection):
            self.put(key, self.by_key[key].options[-1])
        self.cache.clear()


class _MeanKL(PartialKL):
    """The mean KL per position instead of the sum."""

    def full(self) -> float:
        return super().full() / self.positions

    def from_layer(self, layer: int) -> float:
        return super().from_layer(layer) / self.positions


def _grid(structure: _Structure, current: int, levels: int, round_index: int) -> list[int]:
    """The counts a round measures: first ``levels + 1`` evenly spaced over all options, then one
    step either side of the current count, the step halving every round (coarse to fine)."""
    options = structure.options
    if round_index == 0:
        span = len(options) - 1
        picks = {options[round(i * span / levels)] for i in range(levels + 1)}
    else:
        at, step = options.index(current), max(1, round((len(options) - 1) / (levels * 2 ** round_index)))
        picks = {options[min(max(at + j * step, 0), len(options) - 1)] for j in (-1, 1)}
    return sorted(picks | {current})


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of (removed, cost) points sorted by removed."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _interpolate(hull: list[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return hull[-1][1]


def _pieces(s: _Structure, curve: dict[int, float], base: int) -> tuple[list, list]:
    """The structure's steps away from ``base`` along its curve's lower convex hull: removals
    (``base`` down to the least measured count) with their KL added per parameter, and additions
    (up to the most measured count) with their KL saved per parameter; each list in the order the
    steps must be taken, so that convexity keeps the per-parameter values monotone along it."""
    full = s.params[-1]
    hull = _lower_hull(sorted((full - s.cost(c), cost) for c, cost in curve.items()))
    kl = {c: _interpolate(hull, full - s.cost(c)) for c in s.options if min(curve) <= c <= max(curve)}
    down = [c for c in reversed(s.options) if c in kl and c <= base]
    up = [c for c in s.options if c in kl and c >= base]
    removals = [((kl[b] - kl[a]) / (s.cost(a) - s.cost(b)), s.cost(a) - s.cost(b), b) for a, b in zip(down, down[1:])]
    additions = [((kl[a] - kl[b]) / (s.cost(b) - s.cost(a)), s.cost(b) - s.cost(a), b) for a, b in zip(up, up[1:])]
    return removals, additions


def propose(structures: list[_Structure], curves: dict[GroupKey, dict[int, float]], base: dict[GroupKey, int],
            target: float, tolerance: float, limit: float = float("inf")) -> dict[GroupKey, int] | None:
    """Kept counts that trade units from the structures whose curves say they cost least KL per
    parameter to those where units save most, starting from ``base``, while a trade gains, until at
    most ``limit`` parameters were added back; the result removes at least ``target`` parameters
    (at most ``tolerance`` more). ``None`` where the measured range cannot reach the target."""
    state, removed = dict(base), sum(s.params[-1] - s.cost(base[s.key]) for s in structures)
    removals, additions = {}, {}
    for s in structures:
        removals[s.key], additions[s.key] = (list(p) for p in _pieces(s, curves[s.key], base[s.key]))
    order = {s.key: i for i, s in enumerate(structures)}
    blocked: set[GroupKey] = set()
    added = 0.0

    def cheapest(pieces: dict, sign: float):
        keys = [k for k, p in pieces.items() if p and k not in blocked]
        return min(keys, key=lambda k: (sign * pieces[k][0][0], order[k]), default=None)

    while True:
        remove, add = cheapest(removals, 1.0), cheapest(additions, -1.0)
        if removed < target:
            if remove is None:
                return None
            _, params, count = removals[remove][0]
            if removed + params > target + tolerance:
                blocked.add(remove)  # its later steps are no smaller
                continue
            removals[remove].pop(0)
            additions[remove] = []  # a structure that gives units takes none back this round
            state[remove], removed = count, removed + params
        elif add is not None and remove is not None and added < limit and additions[add][0][0] > removals[remove][0][0]:
            _, params, count = additions[add].pop(0)
            removals[add] = []
            state[add], removed, added = count, removed - params, added + params
        else:
            break
    return state if target <= removed <= target + tolerance else None


def moved_parameters(structures: list[_Structure], a: dict[GroupKey, int], b: dict[GroupKey, int]) -> int:
    """Parameters added back to structures between two states (as many were taken elsewhere)."""
    return sum(max(s.cost(b[s.key]) - s.cost(a[s.key]), 0) for s in structures)


@dataclass
class SearchResult:
    widths: dict[int, LayerWidths]
    record: dict


@torch.no_grad()
def search_widths(
    model: nn.Module, layers: list[LayerStructures], scope: PruningScope, scores: dict[GroupKey, Tensor],
    start: dict[int, LayerWidths], windows: Tensor, distill: DistillationSet, settings: WidthSearch, total_params: int,
) -> SearchResult:
    """Per-layer widths at ``scope``'s target with a lower KL to the dense model than ``start``'s
    (or ``start`` itself): see the module docstring. ``windows``: the calibration windows (the
    refits' moments); ``model`` is dense and comes back dense."""
    began = time.perf_counter()
    structures = _structures(layers, scope)
    state = {}
    for s in structures:
        w = start[s.key.layer]
        state[s.key] = w.num_heads if s.key.kind == "attention" else w.num_channels
    searched_target = sum(s.params[-1] - s.cost(state[s.key]) for s in structures)  # the start's size (on target)
    judged = min(settings.judge_windows, len(distill.windows))
    count = min(settings.search_windows, judged)
    first = layers[0].layer
    masked = _MaskedModel(model, structures, scores, scope, windows, settings.damping, settings.batch_size)
    measure = _MeanKL(model, distill[:count], first, settings.batch_size)
    judge = measure if count == judged else _MeanKL(model, distill[:judged], first, settings.batch_size)
    try:
        masked.put_all(state)
        best_state, best_kl = dict(state), judge.full()
        rounds = [{"start_kl": best_kl}]
        evaluations = 0
        for r in range(settings.rounds):
            masked.put_all(best_state)
            base = measure.full()
            curves = {s.key: {best_state[s.key]: base} for s in structures}
            grids = {s.key: _grid(s, best_state[s.key], settings.levels, r) for s in structures}
            progress = Progress(f"width search: round {r + 1}/{settings.rounds}",
                                sum(len(g) - 1 for g in grids.values()), unit="candidate")
            for s in structures:
                for candidate in grids[s.key]:
                    if candidate != best_state[s.key]:
                        masked.put(s.key, candidate, keep=False)
                        curves[s.key][candidate] = measure.from_layer(s.key.layer)
                        evaluations += 1
                        progress.update()
                masked.put(s.key, best_state[s.key])
            progress.close()
            limit, attempts, rejected = float("inf"), [], []
            for _ in range(settings.judgements):  # the curves' trades, validated end to end in steps
                proposal = propose(structures, curves, best_state, searched_target, TOLERANCE * total_params / 2, limit)
                if proposal is None or proposal == best_state or proposal in rejected:
                    break  # nothing to trade, or the smallest step was judged already
                masked.put_all(proposal)
                kl = judge.full()
                moved = moved_parameters(structures, best_state, proposal)
                attempts.append({"moved_parameters": moved, "kl": kl, "accepted": kl < best_kl})
                if kl < best_kl:
                    best_state, best_kl = proposal, kl
                else:
                    rejected.append(proposal)
                    limit = moved / 2
            log.info("width search round %d: KL %s", r + 1,
                     ", ".join(f"{a['kl']:.5f} moving {a['moved_parameters']:,}" for a in attempts) or "no move")
            rounds.append({"round": r + 1, "measured_kl": base, "attempts": attempts, "chosen_kl": best_kl,
                           "curves": {str(key): {str(c): round(v, 6) for c, v in sorted(curve.items())}
                                      for key, curve in curves.items()}})
            masked.put_all(best_state)
            masked.forget(best_state)
    finally:
        masked.restore()
    widths = _widths(best_state, start, scope, layers)
    return SearchResult(widths, {
        "levels": settings.levels, "rounds": rounds, "search_windows": count, "judge_windows": judged,
        "evaluations": evaluations, "damping": settings.damping,
        "start_kl": rounds[0]["start_kl"], "chosen_kl": best_kl,
        "seconds": round(time.perf_counter() - began, 3),
    })
