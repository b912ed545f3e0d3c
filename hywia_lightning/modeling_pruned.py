"""Modeling code for structurally pruned Llama-family checkpoints (written by hywia-lightning).

Exported folders carry a copy of this file, so they load anywhere with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``: it imports only torch and
transformers. The config keeps its family's fields plus three per-layer lists,
``layer_num_attention_heads``, ``layer_num_key_value_heads`` and ``layer_intermediate_size``;
top-level widths describe the widest layer.
"""

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

WIDTH_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def apply_layer_widths(model: nn.Module) -> None:
    """Give every decoder layer the shapes its config lists (weights are loaded afterwards)."""
    config = model.config
    if not all(hasattr(config, key) for key in WIDTH_KEYS):
        return
    for layer, heads, kv_heads, channels in zip(
        model.model.layers, *(getattr(config, key) for key in WIDTH_KEYS)
    ):
        attn, mlp = layer.self_attn, layer.mlp
        hidden, head_dim = config.hidden_size, attn.head_dim
        attn.q_proj = _linear_like(attn.q_proj, hidden, heads * head_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_heads * head_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_heads * head_dim)
        attn.o_proj = _linear_like(attn.o_proj, heads * head_dim, hidden)
        attn.num_key_value_groups = heads // kv_heads
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, channels)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, channels)
        mlp.down_proj = _linear_like(mlp.down_proj, channels, hidden)
        mlp.intermediate_size = channels


class PerLayerWidths:
    """Mixin: build the family's model, then give each layer its own widths."""

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class PrunedLlamaForCausalLM(PerLayerWidths, LlamaForCausalLM):
    pass


class PrunedMistralForCausalLM(PerLayerWidths, MistralForCausalLM):
    pass


class PrunedQwen2ForCausalLM(PerLayerWidths, Qwen2ForCausalLM):
    pass


class PrunedQwen3ForCausalLM(PerLayerWidths, Qwen3ForCausalLM):
    pass


PRUNED_CLASSES = {
    "llama": "PrunedLlamaForCausalLM",
    "mistral": "PrunedMistralForCausalLM",
    "qwen2": "PrunedQwen2ForCausalLM",
    "qwen3": "PrunedQwen3ForCausalLM",
}
