"""Unit-major views of coupled structures: what a granularity sees.

Every tensor of a group is reshaped to ``[num_units, -1]`` so that row ``u`` holds everything unit
``u`` owns across all coupled projections. A granularity then reduces each row to one number.

Groups are built when they are read (:class:`UnitGroups`), so the unit-major copies, and under
sharded accumulators the statistics gathered whole from every rank's shard, exist for one group at
a time while it is scored, not for every pruned layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..distributed.sharded_model import full_weight
from ..distributed.sharded_sums import whole
from .statistics import Statistics
from .structures import AttentionStructure, LayerStructures, MLPStructure

AttentionUnit = Literal["query_heads", "kv_groups", "none"]
ATTENTION_UNITS = ("query_heads", "kv_groups", "none")
Kind = Literal["attention", "mlp"]
MODULE_NAME = {"attention": "self_attn", "mlp": "mlp"}


@dataclass(frozen=True, order=True)
class GroupKey:
    """Which structure of which decoder layer a group is."""

    layer: int
    kind: Kind

    def __str__(self) -> str:  # the module path, as reports and plots name a group
        return f"layers.{self.layer}.{MODULE_NAME[self.kind]}"


@dataclass(frozen=True)
class UnitGroup:
    """One coupled structure of one layer, unit-major.

    ``weights[i]`` and, where estimated, ``grads[i]`` (mean gradient over the calibration windows),
    ``sq_grads[i]`` (mean squared gradient, the diagonal empirical Fisher) are ``[num_units, -1]``
    views of the same parameter. ``input_norms[i]`` / ``input_variance[i]`` hold, for every element
    of ``weights[i]``, the L2 norm / the variance over the calibration tokens of the input feature
    that element multiplies (1 / 0 for biases). ``window_saliency`` is ``[windows, num_units]``:
    per window, the Taylor term ``w·g_j`` summed over everything the unit owns.
    ``output_member`` indexes the member whose *input* features are the units (``o_proj`` or
    ``down_proj`` columns): what the unit writes back into the residual stream.
    ``output_covariance`` is ``[in, in]``, the covariance over the calibration tokens of that
    member's input features (unit ``u`` owns the ``in / num_units`` consecutive ones from ``u·in / num_units``).
    """

    key: GroupKey
    num_layers: int
    num_units: int
    weights: tuple[Tensor, ...]
    output_member: int
    grads: tuple[Tensor, ...] | None = None
    sq_grads: tuple[Tensor, ...] | None = None
    input_norms: tuple[Tensor, ...] | None = None
    input_variance: tuple[Tensor, ...] | None = None
    window_saliency: Tensor | None = None
    output_covariance: Tensor | None = None

    @property
    def name(self) -> str:
        return str(self.key)

    @property
    def kind(self) -> Kind:
        return self.key.kind

    @property
    def layer(self) -> int:
        return self.key.layer


def effective_attention_unit(attn: AttentionStructure, unit: str) -> str:
    """Without grouping (one query head per KV head, as in multi-head attention) a query head can only
    go together with its key/value head: that is a KV group of one."""
    return "kv_groups" if unit == "query_heads" and attn.group_size == 1 else unit


def _rows(tensor: Tensor, units: int) -> Tensor:
    return tensor.reshape(units, -1)


def _cols(tensor: Tensor, units: int) -> Tensor:
    return tensor.t().reshape(units, -1)


# a member: a parameter, its unit-major view, and whether the unit is its *input* side (columns)
Member = tuple[nn.Parameter, Callable[[Tensor, int], Tensor], bool]


def attention_members(attn: AttentionStructure, unit: str) -> list[Member]:
    """The parameters a query head (or a KV group) owns, each with its unit-major view."""
    members: list[Member] = [(attn.q_proj.weight, _rows, False), (attn.o_proj.weight, _cols, True)]
    if attn.q_proj.bias is not None:
        members.append((attn.q_proj.bias, _rows, False))
    if effective_attention_unit(attn, unit) == "kv_groups":
        for proj in (attn.k_proj, attn.v_proj):
            members.append((proj.weight, _rows, False))
            if proj.bias is not None:
                members.append((proj.bias, _rows, False))
    return members


def mlp_members(mlp: MLPStructure) -> list[Member]:
    """The parameters an intermediate channel owns, each with its unit-major view."""
    members: list[Member] = [
        (mlp.gate_proj.weight, _rows, False), (mlp.up_proj.weight, _rows, False), (mlp.down_proj.weight, _cols, True),
    ]
    members += [(proj.bias, _rows, False) for proj in (mlp.gate_proj, mlp.up_proj) if proj.bias is not None]
    return members


def prunable_linears(layers: list[LayerStructures], attention_unit: str) -> list[nn.Linear]:
    """The projections whose statistics estimation must accumulate (nothing else gets an accumulator)."""
    linears: list[nn.Linear] = []
    for s in layers:
        if attention_unit != "none":
            linears += [s.attention.q_proj, s.attention.k_proj, s.attention.v_proj, s.attention.o_proj]
        linears += [s.mlp.gate_proj, s.mlp.up_proj, s.mlp.down_proj]
    return linears


def output_projections(layers: list[LayerStructures], attention_unit: str) -> list[nn.Linear]:
    """The projections whose input features are the units (what a unit writes back)."""
    attention = [s.attention.o_proj for s in layers] if attention_unit != "none" else []
    return attention + [s.mlp.down_proj for s in layers]


def _owner(param: nn.Parameter, linears: dict[int, nn.Linear]) -> nn.Linear | None:
    return linears.get(id(param))  # the Linear whose weight this is (None for a bias)


def build_group(
    key: GroupKey, num_layers: int, num_units: int, members: list[Member], statistics: Statistics | None,
    linears: dict[int, nn.Linear],
) -> UnitGroup:
    with torch.no_grad():
        full = [full_weight(p) for p, _, _ in members]  # FSDP2-sharded weights gathered for this group alone
        weights = tuple(view(w, num_units) for w, (_, view, _) in zip(full, members))
        output_member = next(i for i, (_, _, is_input) in enumerate(members) if is_input)
        if statistics is None:
            return UnitGroup(key, num_layers, num_units, weights, output_member)
        per_param = [statistics.parameters.get(p) for p, _, _ in members]

        def views(field: str) -> tuple[Tensor, ...] | None:
            values = [getattr(s, field) if s is not None else None for s in per_param]
            if any(v is None for v in values):
                return None
            return tuple(view(whole(v), num_units) for v, (_, view, _) in zip(values, members))

        def input_view(p: nn.Parameter, w: Tensor, view, field: str, fill: float) -> Tensor:
            owner = _owner(p, linears)
            if owner is None or owner not in statistics.inputs:  # a bias multiplies no input
                return view(torch.full_like(w, fill), num_units)
            values = getattr(statistics.inputs[owner], field).to(w.dtype)
            return view(values[None, :].expand(w.shape), num_units)

        saliency = None
        if all(s is not None and s.row_saliency is not None for s in per_param):
            saliency = sum(
                (s.col_saliency if is_input else s.row_saliency).reshape(statistics.windows, num_units, -1).sum(-1)
                for s, (_, _, is_input) in zip(per_param, members)
            )
        has_inputs = bool(statistics.inputs)
        output_owner = _owner(members[output_member][0], linears)
        output_inputs = statistics.inputs.get(output_owner) if output_owner is not None else None
        return UnitGroup(
            key, num_layers, num_units, weights, output_member,
            grads=views("grad"), sq_grads=views("sq_grad"),
            input_norms=tuple(input_view(p, w, v, "norm", 1.0) for w, (p, v, _) in zip(full, members))
            if has_inputs else None,
            input_variance=tuple(input_view(p, w, v, "variance", 0.0) for w, (p, v, _) in zip(full, members))
            if has_inputs else None,
            window_saliency=saliency,
            output_covariance=output_inputs.covariance if output_inputs is not None else None,
        )


class UnitGroups(Sequence[UnitGroup]):
    """The groups of :func:`unit_groups`, each built anew whenever it is read: iterate once to score
    (under sharded statistics every read gathers the group's statistics, a collective of all ranks)."""

    def __init__(self, builders: list[Callable[[], UnitGroup]]) -> None:
        self._builders = builders

    def __len__(self) -> int:
        return len(self._builders)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [build() for build in self._builders[index]]
        return self._builders[index]()


def unit_groups(
    layers: list[LayerStructures], attention_unit: str, num_layers: int, statistics: Statistics | None = None,
) -> UnitGroups:
    """Every coupled structure of ``layers`` to score, unit-major: each layer's MLP, then its attention."""
    linears = {id(m.weight): m for m in prunable_linears(layers, attention_unit)}
    builders = []
    for s in layers:
        builders.append(partial(build_group, GroupKey(s.layer, "mlp"), num_layers, s.mlp.num_channels,
                                mlp_members(s.mlp), statistics, linears))
        if attention_unit != "none":
            attn = s.attention
            units = attn.num_kv_heads if effective_attention_unit(attn, attention_unit) == "kv_groups" else attn.num_heads
            builders.append(partial(build_group, GroupKey(s.layer, "attention"), num_layers, units,
                                    attention_members(attn, attention_unit), statistics, linears))
    return UnitGroups(builders)
