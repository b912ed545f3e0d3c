"""Unit-major views of coupled structures: what a granularity scorer sees.

Every tensor of a group is reshaped to ``[num_units, -1]`` so that row ``u`` holds everything unit
``u`` owns across all coupled projections. A scorer then reduces each row to one number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .structures import AttentionStructure, LayerStructures, MLPStructure

ATTENTION_UNITS = ("query_heads", "kv_groups", "none")


@dataclass(frozen=True)
class UnitGroup:
    """One coupled structure of one layer, unit-major.

    ``weights[i]``, ``grads[i]`` (mean gradient over calibration windows) and ``sq_grads[i]`` (mean
    squared gradient, the diagonal empirical Fisher) are ``[num_units, -1]`` views of the same
    parameter. ``input_norms[i]`` holds, for every element of ``weights[i]``, the L2 norm over the
    calibration tokens of the input feature that element multiplies (1 for biases). The statistics
    are ``None`` when no estimation pass ran.
    """

    name: str
    kind: str  # "attention" or "mlp"
    layer: int
    num_layers: int
    num_units: int
    weights: tuple[Tensor, ...]
    grads: tuple[Tensor, ...] | None = None
    sq_grads: tuple[Tensor, ...] | None = None
    input_norms: tuple[Tensor, ...] | None = None


def effective_attention_unit(attn: AttentionStructure, unit: str) -> str:
    """Without grouping (one query head per KV head, as in multi-head attention) a query head can only
    go together with its key/value head: that is a KV group of one."""
    return "kv_groups" if unit == "query_heads" and attn.group_size == 1 else unit


def _rows(tensor: Tensor, units: int) -> Tensor:
    return tensor.reshape(units, -1)


def _cols(tensor: Tensor, units: int) -> Tensor:
    return tensor.t().reshape(units, -1)


def attention_members(attn: AttentionStructure, unit: str) -> list[tuple[nn.Parameter, Callable[[Tensor, int], Tensor]]]:
    """The parameters a query head (or a KV group) owns, each with its unit-major view."""
    members = [(attn.q_proj.weight, _rows), (attn.o_proj.weight, _cols)]
    if attn.q_proj.bias is not None:
        members.append((attn.q_proj.bias, _rows))
    if effective_attention_unit(attn, unit) == "kv_groups":
        for proj in (attn.k_proj, attn.v_proj):
            members.append((proj.weight, _rows))
            if proj.bias is not None:
                members.append((proj.bias, _rows))
    return members


def mlp_members(mlp: MLPStructure) -> list[tuple[nn.Parameter, Callable[[Tensor, int], Tensor]]]:
    """The parameters an intermediate channel owns, each with its unit-major view."""
    members = [(mlp.gate_proj.weight, _rows), (mlp.up_proj.weight, _rows), (mlp.down_proj.weight, _cols)]
    members += [(proj.bias, _rows) for proj in (mlp.gate_proj, mlp.up_proj) if proj.bias is not None]
    return members


def prunable_linears(layers: list[LayerStructures], attention_unit: str) -> list[nn.Linear]:
    """The projections whose statistics estimation must accumulate (nothing else gets an accumulator)."""
    linears: list[nn.Linear] = []
    for s in layers:
        if attention_unit != "none":
            linears += [s.attention.q_proj, s.attention.k_proj, s.attention.v_proj, s.attention.o_proj]
        linears += [s.mlp.gate_proj, s.mlp.up_proj, s.mlp.down_proj]
    return linears


def _input_view(p: nn.Parameter, norm: Tensor | None, view, units: int) -> Tensor:
    if norm is None:  # a bias multiplies no input
        return view(torch.ones_like(p), units)
    return view(norm.to(p.dtype)[None, :].expand(p.shape), units)


def build_group(
    name: str,
    kind: str,
    layer: int,
    num_layers: int,
    num_units: int,
    members: list[tuple[nn.Parameter, Callable[[Tensor, int], Tensor]]],
    statistics: dict[nn.Parameter, tuple[Tensor, Tensor]] | None,
) -> UnitGroup:
    with torch.no_grad():
        weights = tuple(view(p.detach(), num_units) for p, view in members)
        grads = sq_grads = norms = None
        if statistics is not None:
            grads = tuple(view(statistics[p][0], num_units) for p, view in members)
            sq_grads = tuple(view(statistics[p][1], num_units) for p, view in members)
            norms = tuple(_input_view(p, statistics[p][2], view, num_units) for p, view in members)
    return UnitGroup(name, kind, layer, num_layers, num_units, weights, grads, sq_grads, norms)


def attention_group(
    attn: AttentionStructure, unit: str, num_layers: int, statistics: dict | None
) -> UnitGroup:
    num_units = attn.num_kv_heads if effective_attention_unit(attn, unit) == "kv_groups" else attn.num_heads
    return build_group(
        f"layers.{attn.layer}.self_attn", "attention", attn.layer, num_layers, num_units,
        attention_members(attn, unit), statistics,
    )


def mlp_group(mlp: MLPStructure, num_layers: int, statistics: dict | None) -> UnitGroup:
    return build_group(
        f"layers.{mlp.layer}.mlp", "mlp", mlp.layer, num_layers, mlp.num_channels, mlp_members(mlp), statistics
    )
