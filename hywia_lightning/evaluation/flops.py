"""Matrix-multiply FLOPs of a (pruned) Llama-family forward pass, from its config alone.

Why: a pruned model's ideal speedup is the ratio of the work it does, and that work is almost all
matrix products: the q/k/v/o and gate/up/down projections of every layer (per-layer widths read
from ``layer_num_attention_heads``, ``layer_num_key_value_heads``, ``layer_intermediate_size``
when the config has them), the ``lm_head``, and the attention products ``QKᵀ`` and ``AV``, whose
cost grows with the context. One multiply-add counts as 2 FLOPs. Norms, RoPE, softmax and
activations are left out (they are O(width), not O(width²)).

Plain python on the config: no torch, no transformers, so it runs wherever the config is readable.
"""

from __future__ import annotations

from typing import Any

WIDTH_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def _get(config: Any, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def layer_widths(config: Any) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) of every decoder layer."""
    layers = _get(config, "num_hidden_layers")
    per_layer = [_get(config, key) for key in WIDTH_KEYS]
    uniform = (_get(config, "num_attention_heads"), _get(config, "num_key_value_heads") or _get(config, "num_attention_heads"),
               _get(config, "intermediate_size"))
    return [tuple(uniform[k] if per_layer[k] is None else per_layer[k][i] for k in range(3)) for i in range(layers)]


def head_dim(config: Any) -> int:
    return _get(config, "head_dim") or _get(config, "hidden_size") // _get(config, "num_attention_heads")


def projection_flops_per_token(config: Any) -> dict[str, int]:
    """FLOPs per token of the weight matrices: ``attention`` (q, k, v, o), ``mlp`` (gate, up, down),
    ``lm_head``, and their ``total``. Independent of the context length."""
    hidden, dim = _get(config, "hidden_size"), head_dim(config)
    attention = mlp = 0
    for heads, kv_heads, channels in layer_widths(config):
        attention += 2 * hidden * dim * (2 * heads + 2 * kv_heads)  # q and o: heads·dim; k and v: kv_heads·dim
        mlp += 2 * hidden * channels * 3
    lm_head = 2 * hidden * _get(config, "vocab_size")
    return {"attention": attention, "mlp": mlp, "lm_head": lm_head, "total": attention + mlp + lm_head}


def attention_product_flops(config: Any, seq_len: int, causal: bool = True) -> int:
    """FLOPs of ``QKᵀ`` and ``AV`` over one sequence of ``seq_len`` tokens: query ``t`` meets
    ``t + 1`` keys when ``causal`` (what a causal kernel computes), all ``seq_len`` otherwise (what an
    eager implementation computes before masking)."""
    pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    dim = head_dim(config)
    return sum(2 * 2 * heads * dim * pairs for heads, _, _ in layer_widths(config))


def forward_flops(config: Any, batch_size: int, seq_len: int, causal: bool = True) -> int:
    """Matrix-multiply FLOPs of one forward pass over ``batch_size`` sequences of ``seq_len`` tokens."""
    per_token = projection_flops_per_token(config)["total"]
    return batch_size * (seq_len * per_token + attention_product_flops(config, seq_len, causal))


def generate_flops(config: Any, batch_size: int, prompt_len: int, new_tokens: int, causal: bool = True) -> int:
    """FLOPs of greedy generation with a KV cache: the prompt's forward (``lm_head`` on its last
    token only, as ``generate`` asks; ``causal`` as in :func:`attention_product_flops`), then one
    token per step attending to everything before it (the ``new_tokens``-th token needs no step)."""
    projections = projection_flops_per_token(config)
    per_token, lm_head = projections["total"], projections["lm_head"]
    dim = head_dim(config)
    heads_total = sum(heads for heads, _, _ in layer_widths(config))
    prefill = prompt_len * (per_token - lm_head) + lm_head + attention_product_flops(config, prompt_len, causal)
    steps = range(prompt_len + 1, prompt_len + new_tokens)  # context length of each decoding step
    decode = sum(per_token + 2 * 2 * heads_total * dim * context for context in steps)
    return batch_size * (prefill + decode)
