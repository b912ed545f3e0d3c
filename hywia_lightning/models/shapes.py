"""A model's shape without its weights: what the memory plan reads, resolved offline.

Why: a job must be told whether it fits *before* gigabytes of weights are downloaded or loaded, and
the machine running the check may have no network. A shape comes from (in this order) a local
folder's ``config.json``, the bundled model's config (shipped here: converting the GGUF file would
load its weights), the Hugging Face cache (no request is made), or the table below of the common
hub models' public ``config.json`` values. ``None`` when none of them knows the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's sizes; per-layer widths where a pruned export has them."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int | None = None
    layer_intermediate_size: tuple[int, ...] | None = None   # a pruned export's per-layer widths
    layer_num_attention_heads: tuple[int, ...] | None = None
    layer_num_key_value_heads: tuple[int, ...] | None = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]

        def per_layer(name: str) -> tuple[int, ...] | None:
            values = config.get(name)
            return tuple(values) if values is not None and len(values) == layers else None

        return cls(
            hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            max_position_embeddings=config.get("max_position_embeddings"),
            layer_intermediate_size=per_layer("layer_intermediate_size"),
            layer_num_attention_heads=per_layer("layer_num_attention_heads"),
            layer_num_key_value_heads=per_layer("layer_num_key_value_heads"),
        )

    def intermediate(self, layer: int) -> int:
        return self.layer_intermediate_size[layer] if self.layer_intermediate_size else self.intermediate_size

    def heads(self, layer: int) -> int:
        return self.layer_num_attention_heads[layer] if self.layer_num_attention_heads else self.num_attention_heads

    def kv_heads(self, layer: int) -> int:
        return self.layer_num_key_value_heads[layer] if self.layer_num_key_value_heads else self.num_key_value_heads

    def layer_linears(self, layer: int) -> dict[str, tuple[int, int]]:
        """``name: (out_features, in_features)`` of the seven projections of one decoder layer."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate(layer)
        q, kv = self.heads(layer) * d, self.kv_heads(layer) * d
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def layer_parameters(self, layer: int) -> int:
        linears = sum(o * i for o, i in self.layer_linears(layer).values())
        bias = (self.heads(layer) + 2 * self.kv_heads(layer)) * self.head_dim if self.attention_bias else 0
        return linears + bias + 2 * self.hidden_size  # two RMSNorms

    def parameters(self) -> int:
        """Every parameter, a tied embedding counted once."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.hidden_size + sum(self.layer_parameters(i) for i in range(self.num_hidden_layers))


def _llama(h, i, layers, heads, kv, vocab, max_pos, tied=False, bias=False) -> dict:
    return {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": max_pos,
            "tie_word_embeddings": tied, "attention_bias": bias}


#: The public ``config.json`` values of common hub models (instruct/chat variants share their base's shape).
KNOWN_CONFIGS: dict[str, dict] = {
    "bundled:SmolLM2-135M-Instruct": {**_llama(576, 1536, 30, 9, 3, 49152, 8192, tied=True), "head_dim": 64},
    "huggyllama/llama-7b": _llama(4096, 11008, 32, 32, 32, 32000, 2048),
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 32000, 4096),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 32000, 4096),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 32000, 4096),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, 8192),
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, 8192),
    "mistralai/Mistral-7B-v0.1": _llama(4096, 14336, 32, 32, 8, 32000, 32768),
    "Qwen/Qwen2.5-7B": _llama(3584, 18944, 28, 28, 4, 152064, 131072, bias=True),
}
_ALIASES = {
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3-70B-Instruct": "meta-llama/Meta-Llama-3-70B",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
}


def known_config(name: str) -> dict | None:
    lowered = {key.lower(): key for key in [*KNOWN_CONFIGS, *_ALIASES]}
    key = lowered.get(name.lower())
    return None if key is None else KNOWN_CONFIGS[_ALIASES.get(key, key)]


def _cached_hub_config(name: str, cache_dir: str | None) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache  # reads the cache only, never the network
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except Exception:  # an id the hub's naming rules refuse: no cached file
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) and os.path.isfile(path) else None


def resolve_shape(model_name_or_path: str, cache_dir: str | None = None) -> tuple[ModelShape, str] | None:
    """The shape of ``model_name_or_path`` and where it was read; ``None`` when it is not known offline."""
    folder = Path(model_name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return ModelShape.from_config(json.loads((folder / "config.json").read_text())), str(folder / "config.json")
    if model_name_or_path.startswith("bundled:"):
        config = known_config(model_name_or_path)
        return (ModelShape.from_config(config), "the shipped shape of the bundled model") if config else None
    cached = _cached_hub_config(model_name_or_path, None)
    if cached is not None:
        return ModelShape.from_config(cached), "the Hugging Face cache"
    config = known_config(model_name_or_path)
    if config is not None:
        return ModelShape.from_config(config), "the shapes shipped in hywia_lightning/models/shapes.py"
    return None
