"""Modeling code for structurally pruned Llama-family checkpoints (written by hywia-lightning).

Exported folders carry a copy of this file, so they load anywhere with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``: it imports only torch and
transformers. The config keeps its family's fields plus three per-layer lists,
``layer_num_attention_heads``, ``layer_num_key_value_heads`` and ``layer_intermediate_size``;
top-level widths describe the widest layer. A layer with 0 heads has no attention
(:class:`RemovedAttention`); ``layer_output_bias`` lists per layer whether ``o_proj`` and
``down_proj`` carry a bias (the least-squares refit's intercept, FLAP's bias compensation).
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

WIDTH_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
BIAS_KEY = "layer_output_bias"


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    bias = old.bias is not None if bias is None else bias
    if (old.in_features, old.out_features, old.bias is not None) == (in_features, out_features, bias):
        return old
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


class RemovedAttention(nn.Module):
    """A layer's attention with every head pruned: it adds only ``o_proj``'s bias (if any) to the
    residual stream. Keeps zero-width projections so that the layer's shapes stay discoverable."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.head_dim = head_dim
        self.num_key_value_groups = 0

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        out = hidden_states.new_zeros(hidden_states.shape[:-1] + (self.o_proj.out_features,))
        if self.o_proj.bias is not None:
            out = out + self.o_proj.bias
        return out, None


def apply_layer_widths(model: nn.Module) -> None:
    """Give every decoder layer the shapes its config lists (weights are loaded afterwards)."""
    config = model.config
    if not all(hasattr(config, key) for key in WIDTH_KEYS):
        return
    biases = getattr(config, BIAS_KEY, None) or [[False, False]] * len(model.model.layers)
    for layer, heads, kv_heads, channels, (o_bias, down_bias) in zip(
        model.model.layers, *(getattr(config, key) for key in WIDTH_KEYS), biases
    ):
        attn, mlp = layer.self_attn, layer.mlp
        hidden, head_dim = config.hidden_size, attn.head_dim
        attn.q_proj = _linear_like(attn.q_proj, hidden, heads * head_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_heads * head_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_heads * head_dim)
        attn.o_proj = _linear_like(attn.o_proj, heads * head_dim, hidden, o_bias or attn.o_proj.bias is not None)
        if heads == 0:
            layer.self_attn = RemovedAttention(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, head_dim)
        else:
            attn.num_key_value_groups = heads // kv_heads
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, channels)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, channels)
        mlp.down_proj = _linear_like(mlp.down_proj, channels, hidden, down_bias or mlp.down_proj.bias is not None)
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
