"""Physical slicing: apply a pruning plan to a model's Linear weights and config."""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..export.modeling_pruned import BIAS_KEY, WIDTH_KEYS, RemovedAttention
from .plan import PruningPlan, unit_indices
from .structures import decoder_layers, discover_structures


def _slice_linear(linear: nn.Linear, keep: list[int], dim: int) -> None:
    """Keep ``keep`` output rows (dim 0) or input columns (dim 1) of ``linear`` in place."""
    index = torch.tensor(keep, dtype=torch.long, device=linear.weight.device)
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.index_select(dim, index).contiguous(), linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).contiguous(), linear.bias.requires_grad)
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def apply_plan(model: PreTrainedModel, plan: PruningPlan) -> None:
    """Slice every planned layer and write the per-layer widths into ``model.config``."""
    layers = decoder_layers(model)
    for index, layer_plan in plan.layers.items():
        attn, mlp = layers[index].self_attn, layers[index].mlp
        if layer_plan.heads is not None:
            head_dim = attn.head_dim
            _slice_linear(attn.q_proj, unit_indices(layer_plan.heads, head_dim), 0)
            _slice_linear(attn.o_proj, unit_indices(layer_plan.heads, head_dim), 1)
            _slice_linear(attn.k_proj, unit_indices(layer_plan.kv_heads, head_dim), 0)
            _slice_linear(attn.v_proj, unit_indices(layer_plan.kv_heads, head_dim), 0)
            if layer_plan.heads:
                attn.num_key_value_groups = len(layer_plan.heads) // len(layer_plan.kv_heads)
            else:  # every head pruned: the layer has no attention
                layers[index].self_attn = RemovedAttention(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, head_dim)
        if layer_plan.channels is not None:
            _slice_linear(mlp.gate_proj, layer_plan.channels, 0)
            _slice_linear(mlp.up_proj, layer_plan.channels, 0)
            _slice_linear(mlp.down_proj, layer_plan.channels, 1)
            mlp.intermediate_size = len(layer_plan.channels)
    record_layer_widths(model)


_OUTPUT_BIAS = re.compile(r"layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)(?:\.base_layer)?\.bias$")


def add_saved_output_biases(model: PreTrainedModel, saved_names: Iterable[str]) -> int:
    """Give ``o_proj``/``down_proj`` the (zero) biases that a saved state has for them and the model
    lacks (a refit's intercept is no part of the plan), so that the saved weights load; returns how many."""
    layers, added = decoder_layers(model), 0
    for name in saved_names:
        match = _OUTPUT_BIAS.search(name)
        if match is None:
            continue
        layer = layers[int(match.group(1))]
        linear = layer.self_attn.o_proj if match.group(2).startswith("self_attn") else layer.mlp.down_proj
        if linear.bias is None:
            linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features), linear.weight.requires_grad)
            added += 1
    if added:
        record_layer_widths(model)
    return added


def record_layer_widths(model: PreTrainedModel) -> None:
    """Make the config tell the truth: per-layer lists, and the widest layer at top level."""
    structures = discover_structures(model)
    widths = dict(zip(WIDTH_KEYS, (
        [s.attention.num_heads for s in structures],
        [s.attention.num_kv_heads for s in structures],
        [s.mlp.num_channels for s in structures],
    )))
    config = model.config
    config.head_dim = structures[0].attention.head_dim  # explicit: no longer derivable from num_attention_heads
    for key, values in widths.items():
        setattr(config, key, values)
    setattr(config, BIAS_KEY, [[s.attention.o_proj.bias is not None, s.mlp.down_proj.bias is not None] for s in structures])
    config.num_attention_heads = max(widths["layer_num_attention_heads"])
    config.num_key_value_heads = max(widths["layer_num_key_value_heads"])
    config.intermediate_size = max(widths["layer_intermediate_size"])
