"""Write an export folder (Hugging Face weights, config, tokenizer) as one GGUF file for llama.cpp.

Which llama.cpp architecture: ``llama`` reads one head count and one MLP width for every layer, so
an export whose layers all have the same widths is written as ``llama`` (any llama.cpp, Ollama or
LM Studio build runs it). llama.cpp's ``deci`` architecture (Llama blocks, written for NVIDIA's
Nemotron-NAS models) reads ``head_count``, ``head_count_kv`` and ``feed_forward_length`` as
per-layer arrays and skips the attention of a layer with 0 heads and the MLP of a layer with width
0; every other pruned export is written as ``deci``. Both load the optional ``attn_output.bias`` and
``ffn_down.bias`` (our least-squares intercept) and the q/k/v and gate/up biases.

Two of ``deci``'s shortcuts lose something: a 0-head layer skips ``attn_output.bias``, and a
0-width MLP skips ``ffn_down.bias`` and (in the llama.cpp read for this, vendored by
llama-cpp-python 0.3.36) the layer's attention output as well. Such a structure is written with one
all-zero unit instead (one head whose q/k/v/o rows are zero, or one zero channel), which computes
exactly the bias (or nothing). Layer 0 always keeps at least one head: llama.cpp derives the head
size from layer 0's head count.

Rotary embeddings: Hugging Face rotates the two halves of each head (``rotate_half``), llama.cpp's
``llama``/``deci`` rotate adjacent pairs, so the q/k rows of each head are reordered from
``[first half, second half]`` to interleaved pairs. Tensor types: ``float32``, ``float16``,
``bfloat16`` or ``q8_0`` for the matrices (1-D tensors stay float32; a matrix whose rows are not a
multiple of the 32-value q8_0 block stays float16). llama.cpp's ``llama-quantize`` takes a float16
file to any of its types.

Tokenizer: byte-level BPE (SmolLM, Llama 3, Qwen2) as ``tokenizer.ggml.model = gpt2``; the
pre-tokenizer name is read from what the tokenizer's own pre-tokenizer does (:func:`pre_tokenizer_name`).
SentencePiece tokenizers (Llama 1/2, Mistral) are refused for now, with that reason.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)

DTYPES = {
    "float32": gguf.GGMLQuantizationType.F32,
    "float16": gguf.GGMLQuantizationType.F16,
    "bfloat16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "float32": gguf.LlamaFileType.ALL_F32,
    "float16": gguf.LlamaFileType.MOSTLY_F16,
    "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
GGUF_NAME = "model.gguf"  # the file's name inside an export folder (callbacks.Export with formats: [hf, gguf])
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# the pre-tokenizer llama.cpp implements (tokenizer.ggml.pre), recognised by the regex a Split step
# uses before a byte-level step that has use_regex off
_SPLIT_PATTERNS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


@dataclass(frozen=True)
class LayerShape:
    """What llama.cpp is told about one decoder layer (after the zero-unit padding)."""

    heads: int
    kv_heads: int
    channels: int
    pad_heads: bool = False  # one all-zero head written for a 0-head layer
    pad_channels: bool = False  # one all-zero MLP channel written for a 0-width MLP


def model_name(folder: Path) -> str:
    """``general.name``: the folder's name, or its run's for an export called ``export``
    (``runs/prune_smollm2/export`` -> ``prune_smollm2``)."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "export" else folder.name


def export_gguf(export_dir: str | Path, out_path: str | Path, dtype: str = "float16", name: str | None = None) -> Path:
    """Convert the Hugging Face folder ``export_dir`` (an export of ours, or a plain family
    checkpoint) to ``out_path``, written to a temporary name first and renamed when complete;
    ``name`` is the model's name in the file (default: :func:`model_name` of the folder)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    export_dir, out_path = Path(export_dir), Path(out_path)
    config = json.loads((export_dir / "config.json").read_text())
    from transformers import AutoTokenizer  # the tokenizer is read like every user reads it
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    check_exportable(config, tokenizer)
    weights = _load_weights(export_dir)
    shapes = layer_shapes(config, weights)
    arch = "llama" if len(set(shapes)) == 1 and not any(s.pad_heads or s.pad_channels for s in shapes) else "deci"

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        _write_metadata(writer, config, shapes, arch, dtype, name or model_name(export_dir))
        _write_tokenizer(writer, tokenizer, config)
        _write_tensors(writer, config, weights, shapes, DTYPES[dtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    log.info("GGUF: %s (%s, architecture %s, %.1f MB)", out_path, dtype, arch, out_path.stat().st_size / 2**20)
    return out_path


def check_exportable(config: dict, tokenizer) -> None:
    """Refuse, with the reason, what this GGUF export cannot write (cheap: a preflight calls it)."""
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {config.get('model_type')!r} has no GGUF export; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(llama.cpp's llama/deci blocks; Qwen3's per-head q/k norms are not among them)"
        )
    rope = _rope_parameters(config)["rope_type"]
    if rope not in ("default", "linear", "llama3"):
        raise ValueError(f"rope type {rope!r} has no GGUF export yet (default, linear and llama3 have)")
    pre_tokenizer_name(_tokenizer_state(tokenizer))


def _tokenizer_state(tokenizer) -> dict:
    """The fast tokenizer's serialized state, if it is a byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError("GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2); this one is "
                         f"{model.get('type')!r}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
    return state


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def _widths(config: dict) -> tuple[list[int], list[int], list[int]]:
    n = config["num_hidden_layers"]
    heads = config.get("layer_num_attention_heads") or [config["num_attention_heads"]] * n
    kv = config.get("layer_num_key_value_heads") or [config.get("num_key_value_heads") or config["num_attention_heads"]] * n
    channels = config.get("layer_intermediate_size") or [config["intermediate_size"]] * n
    return list(heads), list(kv), list(channels)


def layer_shapes(config: dict, weights: dict[str, torch.Tensor]) -> list[LayerShape]:
    """Per-layer widths from the config, checked against the weights, with the zero-unit padding
    where llama.cpp would otherwise drop a bias (see the module docstring)."""
    shapes = []
    head_dim = _head_dim(config)
    for i, (heads, kv, channels) in enumerate(zip(*_widths(config))):
        prefix = f"model.layers.{i}."
        for name, rows in (("self_attn.q_proj", heads * head_dim), ("self_attn.k_proj", kv * head_dim), ("mlp.gate_proj", channels)):
            actual = weights[prefix + name + ".weight"].shape[0]
            if actual != rows:
                raise ValueError(f"layer {i}: {name} has {actual} rows, the config says {rows}")
        pad_heads = heads == 0 and (prefix + "self_attn.o_proj.bias" in weights or i == 0)
        # a 0-width MLP after attention must be padded too: deci's shortcut for it also drops the attention output
        pad_channels = channels == 0 and (prefix + "mlp.down_proj.bias" in weights or heads > 0 or pad_heads)
        shapes.append(LayerShape(1 if pad_heads else heads, 1 if pad_heads else kv, 1 if pad_channels else channels,
                                 pad_heads, pad_channels))
    return shapes


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope_parameters(config: dict) -> dict:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return {**params, "rope_theta": theta, "rope_type": params.get("rope_type", params.get("type", "default"))}


def _write_metadata(writer: gguf.GGUFWriter, config: dict, shapes: list[LayerShape], arch: str, dtype: str, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_vocab_size(config["vocab_size"])
    heads, kv, channels = ([getattr(s, key) for s in shapes] for key in ("heads", "kv_heads", "channels"))
    if arch == "llama":
        heads, kv, channels = heads[0], kv[0], channels[0]
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_feed_forward_length(channels)
    head_dim = _head_dim(config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":  # llama3: a rope_freqs tensor (_rope_freqs)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for what this byte-level BPE tokenizer's pre-tokenizer does."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_PATTERNS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise ValueError(f"no llama.cpp pre-tokenizer known for this tokenizer's pre-tokenizer {json.dumps(pre)}")


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, config: dict) -> None:
    state = _tokenizer_state(tokenizer)
    model = state["model"]
    vocab_size = config["vocab_size"]
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(state))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    special["bos"] = special["bos"] if special["bos"] is not None else config.get("bos_token_id")
    special["eos"] = special["eos"] if special["eos"] is not None else _first(config.get("eos_token_id"))
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if special[key] is not None:
            add(int(special[key]))
    probe = tokenizer("a").input_ids  # what the tokenizer adds around a text, llama.cpp should too
    writer.add_add_bos_token(bool(probe) and special["bos"] is not None and probe[0] == special["bos"])
    writer.add_add_eos_token(bool(probe) and special["eos"] is not None and probe[-1] == special["eos"] and len(probe) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _first(value):
    return value[0] if isinstance(value, list) else value


def _interleave_rope(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from Hugging Face's ``[half 1, half 2]`` order to llama.cpp's adjacent pairs."""
    if heads == 0:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _rope_freqs(config: dict) -> torch.Tensor | None:
    """Llama 3's frequency scaling as llama.cpp's ``rope_freqs`` divisors (base frequency / scaled one),
    computed by transformers' own rope initialisation."""
    if _rope_parameters(config)["rope_type"] != "llama3":
        return None
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    dim = _head_dim(config)
    base = 1.0 / (_rope_parameters(config)["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (base / scaled.double()).float()


def _write_tensors(writer: gguf.GGUFWriter, config: dict, weights: dict[str, torch.Tensor], shapes: list[LayerShape],
                   qtype: gguf.GGMLQuantizationType) -> None:
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR

    def add(kind: gguf.MODEL_TENSOR, suffix: str, tensor: torch.Tensor, bid: int | None = None) -> None:
        _add_tensor(writer, names[kind].format(bid=bid) + "." + suffix, tensor, qtype)

    add(T.TOKEN_EMBD, "weight", weights["model.embed_tokens.weight"])
    add(T.OUTPUT_NORM, "weight", weights["model.norm.weight"])
    if not config.get("tie_word_embeddings", False):
        add(T.OUTPUT, "weight", weights["lm_head.weight"])
    freqs = _rope_freqs(config)
    if freqs is not None:
        add(T.ROPE_FREQS, "weight", freqs)
    head_dim, hidden = _head_dim(config), config["hidden_size"]
    for i, shape in enumerate(shapes):
        w = {name[len(f"model.layers.{i}."):]: t for name, t in weights.items() if name.startswith(f"model.layers.{i}.")}
        if shape.heads:
            if shape.pad_heads:
                zero_rows = torch.zeros(head_dim, hidden)
                w.update({f"self_attn.{p}_proj.weight": zero_rows for p in "qkv"})
                w["self_attn.o_proj.weight"] = torch.zeros(hidden, head_dim)
                for p in "qkv":
                    w.pop(f"self_attn.{p}_proj.bias", None)
            add(T.ATTN_NORM, "weight", w["input_layernorm.weight"], i)
            for proj, kind, heads in (("q", T.ATTN_Q, shape.heads), ("k", T.ATTN_K, shape.kv_heads), ("v", T.ATTN_V, None),
                                      ("o", T.ATTN_OUT, None)):
                for suffix in ("weight", "bias"):
                    tensor = w.get(f"self_attn.{proj}_proj.{suffix}")
                    if tensor is not None:
                        add(kind, suffix, _interleave_rope(tensor, heads) if heads else tensor, i)
        if shape.channels:
            if shape.pad_channels:
                w.update({"mlp.gate_proj.weight": torch.zeros(1, hidden), "mlp.up_proj.weight": torch.zeros(1, hidden),
                          "mlp.down_proj.weight": torch.zeros(hidden, 1)})
                w.pop("mlp.gate_proj.bias", None), w.pop("mlp.up_proj.bias", None)
            add(T.FFN_NORM, "weight", w["post_attention_layernorm.weight"], i)
            for proj, kind in (("gate", T.FFN_GATE), ("up", T.FFN_UP), ("down", T.FFN_DOWN)):
                for suffix in ("weight", "bias"):
                    tensor = w.get(f"mlp.{proj}_proj.{suffix}")
                    if tensor is not None:
                        add(kind, suffix, tensor, i)


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> None:
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim == 1:  # norms, biases, rope factors: float32, as llama.cpp computes them
        writer.add_tensor(name, data)
        return
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16  # rows not whole q8_0 blocks (a pruned width)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
