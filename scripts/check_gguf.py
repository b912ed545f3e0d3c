"""Run an export's GGUF through llama.cpp and compare it with the Hugging Face export.

    pip install -e ".[gguf-check]"    # llama-cpp-python, compiled from source (CMAKE_BUILD_PARALLEL_LEVEL=1: ~27 min here)
    python scripts/check_gguf.py runs/prune_smollm2/export --out docs/export/check_default

What it does, each number into ``<out>.json`` and ``<out>.md``:

1. converts the folder with ``scripts/export_gguf.py``'s code to float32, float16 and q8_0 GGUF files;
2. logits on 8 prompts, llama.cpp (float32 file) against ``AutoModelForCausalLM.from_pretrained(dir,
   trust_remote_code=True)`` in float32: top-1 agreement over every position and the max abs
   difference; the prompts' tokens from llama.cpp's tokenizer against the HF tokenizer's;
3. greedy generation from llama.cpp (text) next to HF's ``generate`` (same tokens or not);
4. perplexity on the benchmark tokens (the first ``--num-chunks`` x ``--seq-len`` tokens of
   WikiText-2 test, as the benchmark rows do) for HF and every GGUF file, and for the files that
   llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` calls) makes from
   the float16 file (``--quantize``).

``--stress`` first derives a harder export from the given one: layers with 0 heads (with and
without an o_proj bias), 0 MLP channels (with and without a down_proj bias) and an empty layer, the
shapes llama.cpp's ``deci`` architecture treats specially, then checks that one.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from hywia_lightning.data.text_sources import read_text, token_ids
from hywia_lightning.evaluation.perplexity import chunk_tokens, perplexity
from hywia_lightning.export.gguf import export_gguf
from hywia_lightning.progress import Progress

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "<|im_start|>user\nWhat is the largest planet?<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans landed on",
    "The quick brown fox jumps over the lazy dog. The",
]


def llama(path: Path, n_ctx: int, threads: int, float32_cache: bool = False):
    """llama.cpp on one GGUF file, logits of every position kept; ``float32_cache``: a float32 KV
    cache instead of llama.cpp's float16 default (for the logit comparison)."""
    import llama_cpp

    _without_extra_buffers(llama_cpp)
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if float32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=True, verbose=False, **cache)


def _without_extra_buffers(llama_cpp) -> None:
    """Load weights without llama.cpp's extra CPU buffer types (weight repacking, AMX). On this
    machine's Sapphire-Rapids-class cores ggml's AMX kernels for q8_0 die of SIGILL (``tileloadd``,
    the tile state is not enabled for the thread); the plain CPU kernels compute the same model.
    llama-cpp-python has no argument for it, so its default model parameters are wrapped."""
    low = llama_cpp.llama_cpp
    if getattr(low.llama_model_default_params, "without_extra_buffers", False):
        return
    default = low.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    params.without_extra_buffers = True
    low.llama_model_default_params = params


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def greedy(llm, ids: list[int], new_tokens: int) -> list[int]:
    """llama.cpp's own sampling loop, greedy, stopping at end of text like HF's ``generate``."""
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == new_tokens or token == llm.token_eos():
            break
    return out


def llama_perplexity(llm, chunks: torch.Tensor, name: str) -> float:
    """The same quantity as :func:`hywia_lightning.evaluation.perplexity.perplexity`: exp of the mean next-token
    loss over every predicted token of every chunk."""
    total, count = 0.0, 0
    for chunk in Progress(f"perplexity {name}", len(chunks), unit="chunk").iterate(chunks.tolist()):
        logits = torch.from_numpy(llama_logits(llm, chunk)[:-1]).double()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def quantize(source: Path, target: Path, name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source}, {name}) returned {status}")
    return target


def stress_export(export_dir: Path, out_dir: Path) -> Path:
    """The export with the shapes llama.cpp treats specially (see the module docstring)."""
    from hywia_lightning.core.plan import LayerPlan, PruningPlan
    from hywia_lightning.core.slicing import apply_plan, record_layer_widths
    from hywia_lightning.export.huggingface import export_pretrained
    from hywia_lightning.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(str(export_dir))
    layers = model.model.layers
    layers[8].self_attn.o_proj.bias = None  # 0 heads and no bias: llama.cpp skips the attention
    layers[10].mlp.down_proj.bias = None  # 0 channels and no bias after attention: one zero channel
    apply_plan(model, PruningPlan("query_heads", {
        5: LayerPlan(heads=[], kv_heads=[], channels=None),   # 0 heads, o_proj bias: one zero head
        6: LayerPlan(heads=None, kv_heads=None, channels=[]),  # 0 channels, down_proj bias: one zero channel
        7: LayerPlan(heads=[], kv_heads=[], channels=[]),      # both, with both biases
        8: LayerPlan(heads=[], kv_heads=[], channels=None),
        10: LayerPlan(heads=None, kv_heads=None, channels=[]),
    }))
    record_layer_widths(model)
    return export_pretrained(model, tokenizer, out_dir)


def check(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    export_dir = args.export_dir
    work = Path(tempfile.mkdtemp(prefix="check_gguf-"))
    result: dict = {"export_dir": str(export_dir), "command": " ".join(sys.argv), "platform": platform.platform()}
    import llama_cpp
    result["llama_cpp_python"] = llama_cpp.__version__
    if args.stress:
        export_dir = stress_export(export_dir, work / "stress")
        result["stress"] = "layers 5 (0 heads, o bias), 6 (0 channels, down bias), 7 (both), 8 (0 heads, no bias), 10 (0 channels, no bias)"
    config = json.loads((export_dir / "config.json").read_text())
    result["layer_num_attention_heads"] = config.get("layer_num_attention_heads")
    result["layer_intermediate_size"] = config.get("layer_intermediate_size")

    files, seconds = {}, {}
    for dtype in args.dtypes:
        start = time.perf_counter()
        files[dtype] = export_gguf(export_dir, work / f"model-{dtype}.gguf", dtype)
        seconds[f"convert {dtype}"] = round(time.perf_counter() - start, 1)
    for name in args.quantize:
        start = time.perf_counter()
        files[f"llama-quantize {name}"] = quantize(files["float16"], work / f"model-{name}.gguf", name)
        seconds[f"llama-quantize {name}"] = round(time.perf_counter() - start, 1)
    result["sizes_mb"] = {name: round(path.stat().st_size / 2**20, 1) for name, path in files.items()}

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    hf = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    llm = llama(files["float32"], 512, args.threads, float32_cache=True)
    rows, agree, positions, worst, same_tokens = [], 0, 0, 0.0, 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        cpp_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        same_tokens += cpp_ids == ids
        with torch.no_grad():
            reference = hf(torch.tensor([ids])).logits[0].numpy()
        logits = llama_logits(llm, ids)
        top1 = int((logits.argmax(-1) == reference.argmax(-1)).sum())
        diff = float(np.abs(logits - reference).max())
        agree, positions, worst = agree + top1, positions + len(ids), max(worst, diff)
        with torch.no_grad():
            hf_generated = hf.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False)[0, len(ids):].tolist()
        cpp_generated = greedy(llm, ids, args.new_tokens)
        text = llm.detokenize(cpp_generated).decode("utf-8", errors="replace")
        rows.append({"prompt": prompt, "tokens": len(ids), "tokenizer_same": cpp_ids == ids, "top1_agree": f"{top1}/{len(ids)}",
                     "max_abs_diff": round(diff, 5), "llama_cpp_text": text,
                     "same_greedy_tokens_as_hf": cpp_generated == hf_generated})
    result["logits"] = {"prompts": rows, "top1_agreement": agree / positions, "positions": positions,
                        "max_abs_diff": worst, "tokenizer_same": f"{same_tokens}/{len(PROMPTS)}"}
    del llm
    save(args.out, result)

    ids = token_ids(tokenizer, read_text(str(args.ppl_source), "--ppl-source", split="test"))
    chunks = chunk_tokens(ids, args.seq_len, args.num_chunks, source=str(args.ppl_source))
    start = time.perf_counter()
    ppl = {"hf float32": perplexity(hf, chunks)}
    result["perplexity"] = {"source": str(args.ppl_source), "chunks": f"{args.num_chunks} x {args.seq_len}",
                            "values": ppl, "relative_to_hf": {}}
    result["seconds"] = seconds
    seconds["perplexity hf"] = round(time.perf_counter() - start, 1)
    del hf
    for name, path in files.items():
        start = time.perf_counter()
        llm = llama(path, args.seq_len, args.threads)
        ppl[f"gguf {name}"] = llama_perplexity(llm, chunks, name)
        seconds[f"perplexity {name}"] = round(time.perf_counter() - start, 1)
        del llm
        result["perplexity"]["relative_to_hf"] = {k: v / ppl["hf float32"] - 1 for k, v in ppl.items()}
        save(args.out, result)  # what is measured so far survives a crash of the next file
    return result


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    lg, pp = result["logits"], result.get("perplexity", {"chunks": "", "source": "", "values": {}})
    lines = [f"# GGUF check of `{result['export_dir']}`", "", f"Command: `{result['command']}`", "",
             f"llama-cpp-python {result['llama_cpp_python']}, {result['platform']}.", ""]
    if result.get("stress"):
        lines += [f"Stress variant (derived from the export): {result['stress']}.", ""]
    same = "the same in every layer (a stock config)"
    lines += [f"- heads per layer: {result['layer_num_attention_heads'] or same}",
              f"- MLP channels per layer: {result['layer_intermediate_size'] or same}", "",
              "## Logits, llama.cpp (float32 GGUF, float32 KV cache) against the HF export (float32)", "",
              f"Top-1 agreement {lg['top1_agreement']:.4f} over {lg['positions']} positions, max abs difference "
              f"{lg['max_abs_diff']:.2e}; llama.cpp's tokenizer gives the HF tokens on {lg['tokenizer_same']} prompts.", "",
              "| prompt | tokens | top-1 | max abs diff | greedy = HF | llama.cpp continuation |", "|---|---:|---:|---:|---|---|"]
    for row in lg["prompts"]:
        show = lambda s: s.replace("\n", "\\n").replace("|", "\\|")  # noqa: E731
        lines.append(f"| `{show(row['prompt'])}` | {row['tokens']} | {row['top1_agree']} | {row['max_abs_diff']:.2e} | "
                     f"{'yes' if row['same_greedy_tokens_as_hf'] else 'no'} | {show(row['llama_cpp_text'])} |")
    if not pp["values"]:
        return "\n".join(lines + ["", "(no perplexity measured)", ""])
    lines += ["", f"## Perplexity, {pp['chunks']} tokens of `{pp['source']}`", "", "| model | perplexity | vs HF |",
              "|---|---:|---:|"]
    for name, value in pp["values"].items():
        lines.append(f"| {name} ({result['sizes_mb'].get(name.split(' ', 1)[1], '')} MB) | {value:.3f} | {pp['relative_to_hf'][name]:+.3%} |"
                     if name.startswith("gguf") else f"| {name} | {value:.3f} | |")
    lines += ["", "Perplexity runs use llama.cpp's default float16 KV cache.", "",
              "Seconds: " + ", ".join(f"{k} {v}" for k, v in result.get("seconds", {}).items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "q8_0"])
    parser.add_argument("--quantize", nargs="*", default=["q8_0", "q4_k_m"], help="llama.cpp's quantizer, from the float16 file")
    parser.add_argument("--ppl-source", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-chunks", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stress", action="store_true")
    args = parser.parse_args()
    if "float32" not in args.dtypes or (args.quantize and "float16" not in args.dtypes):
        parser.error("--dtypes must include float32 (the logits) and float16 when --quantize is given")
    result = check(args)
    save(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
