"""Discovery of the coupled structures of a decoder: the units that must be removed together.

Attention: a query head is ``head_dim`` rows of ``q_proj`` plus the matching columns of ``o_proj``.
With grouped-query attention a KV group is one ``k_proj``/``v_proj`` head plus its query heads.
MLP: an intermediate channel is a row of ``gate_proj`` and ``up_proj`` plus a column of ``down_proj``.
Discovery works from module names and the config, so it covers every Llama-style decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # importing transformers' PreTrainedModel costs seconds: the memory plan reads no model
    from transformers import PreTrainedModel

# Decoders whose layers are exactly Llama's (q/k/v/o + gated MLP, optional biases, per-head norms).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_WHY_REFUSED = (
    "structured pruning here needs Llama-style decoder layers (self_attn.q/k/v/o_proj and "
    "mlp.gate/up/down_proj, rotary positions, no fused projections)"
)


@dataclass(frozen=True)
class AttentionStructure:
    """One layer's attention projections and head layout."""

    layer: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (0 where the attention was pruned away)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass(frozen=True)
class MLPStructure:
    """One layer's gated MLP projections."""

    layer: int
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear

    @property
    def num_channels(self) -> int:
        return self.gate_proj.out_features


@dataclass(frozen=True)
class LayerStructures:
    layer: int
    attention: AttentionStructure
    mlp: MLPStructure


def check_supported(model: PreTrainedModel) -> None:
    """Refuse architectures we cannot prune, saying which ones we can."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported: {_WHY_REFUSED}. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Llama 1/2/3, Vicuna, SmolLM, Mistral, Qwen2, Qwen3)."
        )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    check_supported(model)
    return model.model.layers


def discover_structures(model: PreTrainedModel) -> list[LayerStructures]:
    """Every decoder layer's coupled structures, with their current (possibly pruned) widths."""
    structures = []
    for index, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = attn.head_dim
        num_heads = attn.q_proj.out_features // head_dim
        num_kv_heads = attn.k_proj.out_features // head_dim
        if (num_kv_heads == 0) != (num_heads == 0) or (num_kv_heads and num_heads % num_kv_heads):
            raise ValueError(f"layer {index}: {num_heads} query heads do not split into {num_kv_heads} KV groups")
        structures.append(
            LayerStructures(
                layer=index,
                attention=AttentionStructure(
                    index, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, head_dim, num_heads, num_kv_heads
                ),
                mlp=MLPStructure(index, mlp.gate_proj, mlp.up_proj, mlp.down_proj),
            )
        )
    return structures


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
