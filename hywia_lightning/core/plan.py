"""Pruning plans: how many units each layer keeps, and which ones.

A plan is plain data (it travels in reports and checkpoints). Widths come from a target fraction
of the model's *total* parameters (embeddings counted, LLM-Pruner's convention): attention takes
the allowed head count nearest to the per-layer ratio (GQA only allows some counts), and MLP
channels absorb the rest so that the total lands on the target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .structures import AttentionStructure, LayerStructures, MLPStructure
from .unit_groups import GroupKey, effective_attention_unit

TOLERANCE = 0.005  # |fraction removed − target| allowed, as a fraction of all parameters


@dataclass
class LayerPlan:
    """Kept unit indices of one layer (sorted); ``None`` leaves that structure as it is."""

    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    channels: list[int] | None = None


@dataclass
class PruningPlan:
    attention_unit: str
    layers: dict[int, LayerPlan] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"attention_unit": self.attention_unit, "layers": {str(i): asdict(p) for i, p in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        return cls(data["attention_unit"], {int(i): LayerPlan(**p) for i, p in data["layers"].items()})


@dataclass(frozen=True)
class LayerWidths:
    """Target unit counts for one layer."""

    num_heads: int
    num_kv_heads: int
    num_channels: int


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _numel(module: nn.Linear) -> int:
    return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)


def head_params(attn: AttentionStructure) -> int:
    """Parameters one query head owns (q rows + o columns)."""
    return (_numel(attn.q_proj) + attn.o_proj.weight.numel()) // attn.num_heads


def kv_head_params(attn: AttentionStructure) -> int:
    return (_numel(attn.k_proj) + _numel(attn.v_proj)) // attn.num_kv_heads


def channel_params(mlp: MLPStructure) -> int:
    return (_numel(mlp.gate_proj) + _numel(mlp.up_proj) + mlp.down_proj.weight.numel()) // mlp.num_channels


def allowed_head_counts(attn: AttentionStructure, attention_unit: str) -> list[tuple[int, int]]:
    """(query heads, KV heads) a layer may keep, from the least to the most."""
    attention_unit = effective_attention_unit(attn, attention_unit)
    if attention_unit == "none":
        return [(attn.num_heads, attn.num_kv_heads)]
    if attention_unit == "kv_groups":
        return [(g * attn.group_size, g) for g in range(1, attn.num_kv_heads + 1)]
    return [(k * attn.num_kv_heads, attn.num_kv_heads) for k in range(1, attn.group_size + 1)]


def allocate_widths(
    layers: list[LayerStructures],
    total_params: int,
    target_ratio: float,
    attention_unit: str,
    heads_to_keep: int | None = None,
    round_to: int = 1,
    equal_widths: bool = False,
) -> dict[int, LayerWidths]:
    """Uniform per-layer widths over ``layers`` that remove ``target_ratio`` of ``total_params``
    (with ``equal_widths`` the same MLP width in every layer, no remainder steps).

    Raises ``ValueError`` naming the key to change when the target cannot be met.
    """
    target = target_ratio * total_params
    layer_params = sum(
        a.num_heads * head_params(a) + a.num_kv_heads * kv_head_params(a) + m.num_channels * channel_params(m)
        for a, m in ((s.attention, s.mlp) for s in layers)
    )
    per_layer_ratio = target / layer_params
    attention = {}
    for s in layers:
        options = allowed_head_counts(s.attention, attention_unit)
        if heads_to_keep is not None:
            matching = [o for o in options if o[0] == heads_to_keep]
            if not matching:
                raise ValueError(
                    f"heads_to_keep={heads_to_keep} cannot be met in layer {s.layer} with attention_unit="
                    f"{attention_unit!r} ({s.attention.num_heads} query heads in {s.attention.num_kv_heads} KV groups); "
                    f"allowed: {[o[0] for o in options]}"
                )
            attention[s.layer] = matching[0]
        else:
            wanted = (1 - per_layer_ratio) * s.attention.num_heads
            attention[s.layer] = min(options, key=lambda o: (abs(o[0] - wanted), -o[0]))
    removed_by_attention = sum(
        (s.attention.num_heads - attention[s.layer][0]) * head_params(s.attention)
        + (s.attention.num_kv_heads - attention[s.layer][1]) * kv_head_params(s.attention)
        for s in layers
    )
    channels = _allocate_channels(layers, target - removed_by_attention, round_to, equal_widths)
    widths = {s.layer: LayerWidths(*attention[s.layer], channels[s.layer]) for s in layers}
    reached = (removed_by_attention + sum(
        (s.mlp.num_channels - channels[s.layer]) * channel_params(s.mlp) for s in layers
    )) / total_params
    if abs(reached - target_ratio) > TOLERANCE:
        most = sum(
            (s.attention.num_heads - allowed_head_counts(s.attention, attention_unit)[0][0]) * head_params(s.attention)
            + (s.attention.num_kv_heads - allowed_head_counts(s.attention, attention_unit)[0][1]) * kv_head_params(s.attention)
            + (s.mlp.num_channels - round_to) * channel_params(s.mlp)
            for s in layers
        ) / total_params
        raise ValueError(
            f"target_ratio={target_ratio} cannot be reached within {TOLERANCE} over layers "
            f"{layers[0].layer}..{layers[-1].layer} (closest: {reached:.4f}; at most {most:.4f} is removable there "
            f"with attention_unit={attention_unit!r}, heads_to_keep={heads_to_keep}, round_to={round_to}); "
            "widen the layer range (layer_start/layer_end), lower target_ratio, or change those keys"
        )
    return widths


def _allocate_channels(layers: list[LayerStructures], params_to_remove: float, round_to: int,
                       equal_widths: bool = False) -> dict[int, int]:
    """Kept MLP channels per layer, multiples of ``round_to`` where possible, removing about
    ``params_to_remove`` in total; the remainder steps go to the last layers first (none with ``equal_widths``)."""
    per_channel = channel_params(layers[0].mlp)
    steps_total = max(0, round(params_to_remove / (per_channel * round_to)))
    kept = {}
    base, extra = divmod(steps_total, len(layers))
    if equal_widths:
        base, extra = max(0, round(steps_total / len(layers))), 0
    for position, s in enumerate(reversed(layers)):
        steps = base + (1 if position < extra else 0)
        max_steps = (s.mlp.num_channels - 1) // round_to
        kept[s.layer] = s.mlp.num_channels - min(steps, max_steps) * round_to
    return kept


def top_units(scores: Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest scores, sorted; ties go to the lower index."""
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(order[:keep].tolist())


def select_heads(
    head_scores: Tensor, attn: AttentionStructure, widths: LayerWidths, attention_unit: str
) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads. ``head_scores`` has one score per unit of ``attention_unit``."""
    if effective_attention_unit(attn, attention_unit) == "kv_groups":
        kv = top_units(head_scores, widths.num_kv_heads)
        return [g * attn.group_size + h for g in kv for h in range(attn.group_size)], kv
    per_group = widths.num_heads // attn.num_kv_heads
    if per_group == 0:
        return [], []  # the whole attention goes
    grouped = head_scores.reshape(attn.num_kv_heads, attn.group_size)
    heads = [g * attn.group_size + h for g in range(attn.num_kv_heads) for h in top_units(grouped[g], per_group)]
    return heads, list(range(attn.num_kv_heads))


def unit_indices(units: list[int], size: int) -> list[int]:
    """Row (or column) indices of whole units of ``size`` rows each."""
    return [u * size + i for u in units for i in range(size)]


def kept_output_columns(key: GroupKey, scores: Tensor, s: LayerStructures, widths: LayerWidths,
                        attention_unit: str) -> list[int]:
    """The input features of the group's output projection (``o_proj``, ``down_proj``) that
    :func:`make_plan` keeps for these scores at these widths."""
    if key.kind == "mlp":
        return top_units(scores, widths.num_channels)
    heads, _ = select_heads(scores, s.attention, widths, attention_unit)
    return unit_indices(heads, s.attention.head_dim)


def make_plan(
    layers: list[LayerStructures], scores: dict, widths: dict[int, LayerWidths], attention_unit: str
) -> PruningPlan:
    """The highest-scoring units of every group, as many as the widths keep (``scores`` by GroupKey)."""
    plan = PruningPlan(attention_unit)
    for s in layers:
        w = widths[s.layer]
        layer_plan = LayerPlan(channels=top_units(scores[GroupKey(s.layer, "mlp")], w.num_channels))
        if attention_unit != "none":
            layer_plan.heads, layer_plan.kv_heads = select_heads(
                scores[GroupKey(s.layer, "attention")], s.attention, w, attention_unit
            )
        plan.layers[s.layer] = layer_plan
    return plan
