"""Per-layer widths: how many heads and channels each pruned layer keeps.

- :class:`UniformAllocation`: every pruned layer loses the same share (LLM-Pruner's choice).
- :class:`GlobalAllocation`: FLAP's adaptive structure. Scores are put on one scale, then the
  least important removable pieces of *all* layers are taken, lowest score first, until the
  target is met: an MLP channel (or a ``round_to`` block of them), for query heads the r-th least
  important head of every KV group together, for KV groups a whole group. ``standardize: group``
  standardizes each group's scores within the group (``(s − mean) / std``, FLAP's choice: every
  layer's units compete by how they stand in their own layer); ``kind`` standardizes the logs of
  all groups of one structure kind together (positive scores; scores that already are logs, as
  HyWIA's, are taken as they are), so a layer whose units all score low can lose all of them;
  ``none`` compares raw scores per parameter (a damage estimate such as ``element2`` or
  ``fluctuation`` is additive and comparable across layers and structure kinds as it is).
  ``min_keep``/``max_keep`` bound the share of units kept per structure (``min_keep: 0`` lets a
  layer lose its whole attention or MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .plan import (
    TOLERANCE, LayerWidths, allocate_widths, allowed_head_counts, channel_params, head_params, kv_head_params,
)
from .structures import LayerStructures
from .unit_groups import ATTENTION_UNITS, GroupKey, effective_attention_unit


@dataclass(frozen=True)
class PruningScope:
    """What a plan may touch and how much it must remove (the pruning callback's own keys)."""

    target_ratio: float
    attention_unit: str = "query_heads"
    heads_to_keep: int | None = None
    round_to: int = 1

    def __post_init__(self) -> None:
        """Refuse what no plan can meet, for library callers as for the pruning callback's keys."""
        if not 0 < self.target_ratio < 1:
            raise ValueError(f"target_ratio={self.target_ratio} must be in (0, 1): the fraction of all parameters removed")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"attention_unit={self.attention_unit!r} is unknown; allowed: {', '.join(ATTENTION_UNITS)}")
        if self.heads_to_keep is not None and self.heads_to_keep < 1:
            raise ValueError(f"heads_to_keep={self.heads_to_keep} must be at least 1 (or None: the allocation decides)")
        if self.round_to < 1:
            raise ValueError(f"round_to={self.round_to} must be at least 1")


class Allocation:
    """Turns a target into per-layer widths; ``scores`` are the per-unit scores of every group."""

    #: whether :meth:`widths` reads the scores (a uniform split does not)
    needs_scores: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Allocation").lower()

    def widths(
        self, layers: list[LayerStructures], total_params: int, scope: PruningScope,
        scores: dict[GroupKey, Tensor] | None = None,
    ) -> dict[int, LayerWidths]:
        raise NotImplementedError


class UniformAllocation(Allocation):
    """The same share removed from every pruned layer."""

    needs_scores = False

    def __init__(self, equal_widths: bool = False) -> None:
        """
        Args:
            equal_widths: every pruned layer keeps exactly the same MLP width (the remainder steps
                that would widen some layers by ``round_to`` are rounded away, within the target's
                tolerance). With ``heads_to_keep`` over all layers this makes a stock export
                (``from_pretrained`` without remote code, llama.cpp's plain ``llama``).
        """
        self.equal_widths = equal_widths

    def widths(self, layers, total_params, scope, scores=None):
        return allocate_widths(layers, total_params, scope.target_ratio, scope.attention_unit, scope.heads_to_keep,
                               scope.round_to, self.equal_widths)


@dataclass
class _Piece:
    """A removable piece of one structure: taking it lowers that structure's kept count by one step."""

    score: float
    units: int   # units it removes
    group: int   # position of its structure, for a stable order
    step: int    # 0 for the least important piece of the structure
    params: int
    layer: int
    kind: str


class GlobalAllocation(Allocation):
    def __init__(self, min_keep: float = 0.0, max_keep: float = 1.0,
                 standardize: Literal["group", "kind", "none"] = "group") -> None:
        """
        Args:
            min_keep: least share of its units (heads per KV group, KV groups, channels) a pruned
                structure keeps; 0 lets a layer lose its whole attention or MLP.
            max_keep: largest share a structure keeps (1: a layer may stay whole).
            standardize: ``group`` (within each group, FLAP), ``kind`` (across all groups of a kind)
                or ``none`` (raw non-negative scores, ranked per parameter removed).
        """
        if not 0 <= min_keep <= max_keep <= 1:
            raise ValueError(f"min_keep={min_keep}, max_keep={max_keep}: need 0 <= min_keep <= max_keep <= 1")
        if standardize not in ("group", "kind", "none"):
            raise ValueError(f"standardize={standardize!r} is unknown; allowed: group, kind, none")
        self.min_keep, self.max_keep, self.standardize = min_keep, max_keep, standardize

    def _bounds(self, units: int) -> tuple[int, int]:
        """Fewest and most units a structure of ``units`` may keep."""
        return math.ceil(self.min_keep * units - 1e-9), math.floor(self.max_keep * units + 1e-9)

    def widths(self, layers, total_params, scope, scores=None):
        if scores is None:
            raise ValueError("GlobalAllocation ranks units of all layers together: it needs their scores")
        scores = _standardized(scores, self.standardize)
        forced, pieces = [], []
        for position, s in enumerate(layers):
            channels = s.mlp.num_channels
            structures = [(self._mlp_pieces(s, scores[GroupKey(s.layer, "mlp")], scope.round_to, 2 * position),
                           lambda k, n=channels: n - _channels_removed(n, scope.round_to, k))]
            if scope.attention_unit != "none" and scope.heads_to_keep is None:
                units = _attention_units(s, scope.attention_unit)
                structures.append((
                    self._attention_pieces(s, scores[GroupKey(s.layer, "attention")], scope.attention_unit,
                                           2 * position + 1),
                    lambda k, n=units: n - k,
                ))
            for structure_pieces, kept_after in structures:
                _ordered_within(structure_pieces, per_parameter=self.standardize == "none")
                fewest, most = self._bounds(kept_after(0))
                steps = range(len(structure_pieces) + 1)
                first = min(k for k in steps if kept_after(k) <= most)    # the ceiling forces these
                last = max(k for k in steps if kept_after(k) >= fewest)   # the floor stops here
                forced += structure_pieces[:first]
                pieces += structure_pieces[first:max(first, last)]
        fixed = _fixed_attention_removal(layers, scope)
        target = scope.target_ratio * total_params - fixed
        chosen = list(forced)
        removed = sum(p.params for p in forced)
        blocked = set()  # structures whose next piece would overshoot: their later pieces cannot go either
        for p in sorted(pieces, key=lambda p: (p.score, p.group, p.step)):
            if removed >= target:
                break
            if p.group in blocked:
                continue
            if removed + p.params > target + TOLERANCE * total_params / 2:
                blocked.add(p.group)
                continue
            chosen.append(p)
            removed += p.params
        widths = self._apply(layers, chosen, scope)
        reached = (fixed + sum(p.params for p in chosen)) / total_params
        if abs(reached - scope.target_ratio) > TOLERANCE:
            raise ValueError(
                f"target_ratio={scope.target_ratio} cannot be reached within {TOLERANCE} over layers "
                f"{layers[0].layer}..{layers[-1].layer} with GlobalAllocation(min_keep={self.min_keep}, "
                f"max_keep={self.max_keep}) (closest: {reached:.4f}); lower min_keep or target_ratio, raise max_keep, "
                "or widen the layer range (layer_start/layer_end)"
            )
        return widths

    @staticmethod
    def _mlp_pieces(s: LayerStructures, z: Tensor, round_to: int, group: int) -> list[_Piece]:
        order = torch.sort(z, stable=True).values
        per_channel, pieces, start, step = channel_params(s.mlp), [], 0, 0
        while start < len(order):
            size = _chunk(s.mlp.num_channels, round_to, step)
            pieces.append(_Piece(float(order[start : start + size].mean()), size, group, step, size * per_channel, s.layer, "mlp"))
            start, step = start + size, step + 1
        return pieces

    @staticmethod
    def _attention_pieces(s: LayerStructures, z: Tensor, attention_unit: str, group: int) -> list[_Piece]:
        a = s.attention
        if effective_attention_unit(a, attention_unit) == "kv_groups":
            cost = a.group_size * head_params(a) + kv_head_params(a)
            order = torch.sort(z, stable=True).values
            return [_Piece(float(v), 1, group, i, cost, s.layer, "attention") for i, v in enumerate(order)]
        ranked = torch.sort(z.reshape(a.num_kv_heads, a.group_size), dim=1, stable=True).values  # per KV group, ascending
        pieces = []
        for r in range(a.group_size):
            cost = a.num_kv_heads * head_params(a) + (a.num_kv_heads * kv_head_params(a) if r == a.group_size - 1 else 0)
            pieces.append(_Piece(float(ranked[:, r].mean()), a.num_kv_heads, group, r, cost, s.layer, "attention"))
        return pieces

    @staticmethod
    def _apply(layers: list[LayerStructures], chosen: list[_Piece], scope: PruningScope) -> dict[int, LayerWidths]:
        steps = {}
        for p in chosen:
            steps[(p.layer, p.kind)] = steps.get((p.layer, p.kind), 0) + 1
        widths = {}
        for s in layers:
            a, m = s.attention, s.mlp
            channels = m.num_channels - _channels_removed(m.num_channels, scope.round_to, steps.get((s.layer, "mlp"), 0))
            options = allowed_head_counts(a, scope.attention_unit)
            if scope.heads_to_keep is not None:
                heads, kv = next(o for o in options if o[0] == scope.heads_to_keep)
            elif scope.attention_unit == "none":
                heads, kv = a.num_heads, a.num_kv_heads
            else:
                removed = steps.get((s.layer, "attention"), 0)
                if effective_attention_unit(a, scope.attention_unit) == "kv_groups":
                    kv = a.num_kv_heads - removed
                    heads = kv * a.group_size
                else:
                    heads = (a.group_size - removed) * a.num_kv_heads
                    kv = a.num_kv_heads if heads else 0
            widths[s.layer] = LayerWidths(heads, kv, channels)
        return widths


def _ordered_within(pieces: list[_Piece], per_parameter: bool) -> None:
    """Piece scores of one structure, made non-decreasing: its pieces go in order, least important first."""
    highest = -math.inf
    for p in pieces:
        if per_parameter:
            p.score = p.score * p.units / p.params
        highest = p.score = max(p.score, highest)


def _attention_units(s: LayerStructures, attention_unit: str) -> int:
    a = s.attention
    return a.num_kv_heads if effective_attention_unit(a, attention_unit) == "kv_groups" else a.group_size


def _chunk(channels: int, round_to: int, step: int) -> int:
    """Channels the ``step``-th MLP piece removes: first down to a multiple of ``round_to``, then ``round_to`` each."""
    first = channels - round_to * ((channels - 1) // round_to) if channels > round_to else channels
    return first if step == 0 else round_to


def _channels_removed(channels: int, round_to: int, steps: int) -> int:
    return min(channels, sum(_chunk(channels, round_to, i) for i in range(steps)))


def _fixed_attention_removal(layers: list[LayerStructures], scope: PruningScope) -> int:
    """Parameters a fixed ``heads_to_keep`` removes, outside the global ranking."""
    if scope.heads_to_keep is None or scope.attention_unit == "none":
        return 0
    removed = 0
    for s in layers:
        heads, kv = next((o for o in allowed_head_counts(s.attention, scope.attention_unit) if o[0] == scope.heads_to_keep),
                         (None, None))
        if heads is None:
            raise ValueError(f"heads_to_keep={scope.heads_to_keep} cannot be met in layer {s.layer}; allowed: "
                             f"{[o[0] for o in allowed_head_counts(s.attention, scope.attention_unit)]}")
        removed += (s.attention.num_heads - heads) * head_params(s.attention)
        removed += (s.attention.num_kv_heads - kv) * kv_head_params(s.attention)
    return removed


def _z(values: Tensor) -> Tensor:
    return (values - values.mean()) / values.std(unbiased=False).clamp_min(1e-12)


def _standardized(scores: dict[GroupKey, Tensor], how: str) -> dict[GroupKey, Tensor]:
    """All groups' scores on one scale for ranking across groups (see the module docstring)."""
    if how == "none":
        if any((s < 0).any() for s in scores.values()):
            raise ValueError("GlobalAllocation(standardize='none') ranks raw scores per parameter: they must be "
                             "non-negative (a fused HyWIA score is not); use standardize: group or kind")
        return {key: s.double() for key, s in scores.items()}
    if how == "group":
        return {key: _z(s.double()) for key, s in scores.items()}
    out = {}
    for kind in {key.kind for key in scores}:
        keys = [key for key in scores if key.kind == kind]
        flat = torch.cat([scores[key].double() for key in keys])
        if (flat >= 0).all():  # raw scores: compare their logs (heavy tails)
            flat = torch.log(flat + 1e-6 * flat.mean().clamp_min(1e-30) + 1e-30)
        z = _z(flat)
        for key, part in zip(keys, z.split([scores[key].numel() for key in keys])):
            out[key] = part
    return out


ALLOCATIONS = {"uniform": UniformAllocation, "global": GlobalAllocation}


def make_allocation(spec: str | Allocation) -> Allocation:
    if isinstance(spec, Allocation):
        return spec
    if spec not in ALLOCATIONS:
        raise ValueError(f"allocation={spec!r} is unknown; allowed: {', '.join(ALLOCATIONS)}, or an Allocation by class_path")
    return ALLOCATIONS[spec]()
