"""Forward and ``generate`` throughput of pruned models against the dense one, in one run, against
the ideal speedup from the matrix-multiply FLOP ratio (hywia_lightning/evaluation/flops.py).

Models are timed in alternation (dense, pruned, dense, ...; median of the repetitions), so load
from other processes hits all of them alike. Pruned models come from:

- ``--export DIR``: an export folder (a real plan, loaded as any user would load it);
- ``--round-to R,R,...``: the dense model sliced to the widths ``allocate_widths`` gives for
  ``--target`` over ``--layers`` with each ``round_to`` (the first units are kept: speed depends
  only on the shapes, not on which units survive);
- ``--widths H:C,...``: every layer of ``--layers`` keeps H query heads (per model, spread evenly
  over the KV groups) and C MLP channels.

``--random-weights PRESET`` builds the dense model from a built-in config with random weights
(``smollm2-135m``, ``llama-7b``), so the script runs where the bundled model is absent (a GPU
machine); that mode needs only torch and transformers (scripts/gpu_checks.sh).

    python scripts/benchmark_speed.py --export runs/bench/element1_50/export --round-to 1,8,32,64,128 \\
        --out-dir docs/performance --name speed_cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent


def _library() -> None:
    """Make ``hywia_lightning``'s torch/transformers-only modules importable. Its ``__init__``
    imports Lightning and plotting, which a bare GPU machine may lack: then the package is
    registered without running it, and only the plain modules used here are imported."""
    try:
        import hywia_lightning  # noqa: F401
    except ImportError:
        package = types.ModuleType("hywia_lightning")
        package.__path__ = [str(ROOT / "hywia_lightning")]
        sys.modules["hywia_lightning"] = package


_library()
from hywia_lightning.evaluation import flops, throughput  # noqa: E402
from hywia_lightning.export import modeling_pruned  # noqa: E402

PRESETS = {  # dense configs for --random-weights (shapes of the public models; weights random)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=128, tie_word_embeddings=False,
                     max_position_embeddings=4096),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", default="bundled:SmolLM2-135M-Instruct", help="dense model (ignored with --random-weights)")
    parser.add_argument("--random-weights", choices=sorted(PRESETS), help="build the dense model from a preset config")
    parser.add_argument("--export", action="append", default=[], help="an export folder (repeatable)")
    parser.add_argument("--round-to", default="", help="comma-separated round_to values to slice widths for")
    parser.add_argument("--widths", default="", help="comma-separated HEADS:CHANNELS uniform over --layers")
    parser.add_argument("--target", type=float, default=0.5, help="target_ratio for --round-to widths")
    parser.add_argument("--layers", default="4:28", help="pruned layers start:end for --round-to/--widths (end may be negative)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence in the forward pass")
    parser.add_argument("--gen-batch-size", type=int, default=1, help="sequences per generate call")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each model (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--out-dir", default="docs/performance")
    parser.add_argument("--name", default="speed")
    return parser.parse_args()


def layer_range(spec: str, num_layers: int) -> range:
    start, end = (int(v) for v in spec.split(":"))
    start, end = start % num_layers if start < 0 else start, end + num_layers if end < 0 else end
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"--layers={spec!r} selects no valid range of {num_layers} layers")
    return range(start, end)


def random_dense(preset: str, dtype: torch.dtype, device: str):
    config = transformers.LlamaConfig(**PRESETS[preset])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def pruned_from_widths(dense, widths: dict[int, tuple[int, int, int]]):
    """A pruned copy of ``dense`` whose layers in ``widths`` keep (heads, KV heads, channels): the
    first units of each structure (query heads spread evenly over the KV groups)."""
    config = copy.deepcopy(dense.config)
    per_layer = [list(w) for w in flops.layer_widths(config)]
    for index, w in widths.items():
        per_layer[index] = list(w)
    for key, values in zip(modeling_pruned.WIDTH_KEYS, zip(*per_layer)):
        setattr(config, key, list(values))
    config.auto_map = {"AutoModelForCausalLM": "modeling_pruned.PrunedLlamaForCausalLM"}
    param = next(dense.parameters())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(param.dtype)
    try:
        with torch.device(param.device):
            model = modeling_pruned.PrunedLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    dim = flops.head_dim(config)
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in dense.state_dict().items() if ".layers." not in k}, strict=False)
        for (heads, kv_heads, channels), src, dst in zip(per_layer, dense.model.layers, model.model.layers):
            group = src.self_attn.q_proj.out_features // src.self_attn.k_proj.out_features
            q_rows = [(g * group + h) * dim + d for g in range(kv_heads) for h in range(heads // kv_heads) for d in range(dim)]
            kv_rows = list(range(kv_heads * dim))
            rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": range(channels), "up_proj": range(channels)}
            for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
                for name in names:
                    s, d = getattr(getattr(src, block), name), getattr(getattr(dst, block), name)
                    d.weight.copy_(s.weight[list(rows[name])])
                    if s.bias is not None:
                        d.bias.copy_(s.bias[list(rows[name])])
            dst.self_attn.o_proj.weight.copy_(src.self_attn.o_proj.weight[:, q_rows])
            dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight[:, :channels])
            for name in ("input_layernorm", "post_attention_layernorm"):
                getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    return model.eval()


def uniform_widths(dense, layers: range, spec: str) -> dict[int, tuple[int, int, int]]:
    heads, channels = (int(v) for v in spec.split(":"))
    config = dense.config
    mha = (config.num_key_value_heads or config.num_attention_heads) == config.num_attention_heads
    kv_heads = heads if mha else config.num_key_value_heads  # multi-head attention: a head goes with its KV head
    if heads % kv_heads:
        raise ValueError(f"--widths {spec!r}: heads={heads} must be a multiple of the {kv_heads} KV heads")
    return {i: (heads, kv_heads, channels) for i in layers}


def allocated_widths(dense, layers: range, target: float, round_to: int) -> dict[int, tuple[int, int, int]]:
    """The widths the pruning callback would give (needs this package)."""
    from hywia_lightning.core.plan import allocate_widths, count_parameters
    from hywia_lightning.core.structures import discover_structures

    structures = discover_structures(dense)
    widths = allocate_widths([structures[i] for i in layers], count_parameters(dense), target, "query_heads",
                             None, round_to)
    return {i: (w.num_heads, w.num_kv_heads, w.num_channels) for i, w in widths.items()}


def parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    load_before = os.getloadavg()
    if args.random_weights:
        dense = random_dense(args.random_weights, dtype, args.device)
        dense_name = f"random:{args.random_weights}"
    else:
        from hywia_lightning.models.loading import load_causal_lm

        dense = load_causal_lm(args.dense, None, args.dtype)[0].to(device)
        dense_name = args.dense
    num_layers = dense.config.num_hidden_layers
    layers = layer_range(args.layers, num_layers)
    models = {"dense": dense}
    for folder in args.export:
        models[f"export:{Path(folder).parent.name or folder}"] = transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, dtype=dtype).to(device).eval()
    for value in filter(None, args.round_to.split(",")):
        models[f"round_to={int(value)}"] = pruned_from_widths(dense, allocated_widths(dense, layers, args.target, int(value)))
    for spec in filter(None, args.widths.split(",")):
        models[f"widths={spec}"] = pruned_from_widths(dense, uniform_widths(dense, layers, spec))

    vocab = dense.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    forward_ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
    prompt_ids = torch.randint(0, vocab, (args.gen_batch_size, args.prompt_len), generator=generator).to(device)

    start = time.perf_counter()
    forward = throughput.interleaved_seconds(
        {name: throughput.forward_run(m, forward_ids) for name, m in models.items()}, args.repeats, device=device)
    generate = {} if args.no_generate else throughput.interleaved_seconds(
        {name: throughput.generate_run(m, prompt_ids, args.new_tokens) for name, m in models.items()},
        args.repeats, device=device)
    elapsed = time.perf_counter() - start

    rows = {}
    for name, model in models.items():
        config = model.config
        row = {
            "parameters": parameters(model),
            "layer_widths": {"heads": [w[0] for w in flops.layer_widths(config)],
                             "kv_heads": [w[1] for w in flops.layer_widths(config)],
                             "channels": [w[2] for w in flops.layer_widths(config)]},
            "flops_per_token": flops.projection_flops_per_token(config),
            "forward": throughput.summarize(forward[name], args.batch_size * args.seq_len),
            "forward_flops": flops.forward_flops(config, args.batch_size, args.seq_len),
        }
        if generate:
            row["generate"] = throughput.summarize(generate[name], args.gen_batch_size * args.new_tokens)
            row["generate_flops"] = flops.generate_flops(config, args.gen_batch_size, args.prompt_len, args.new_tokens)
        rows[name] = row
    base = rows["dense"]
    for row in rows.values():
        for kind in ("forward", "generate"):
            if kind not in row:
                continue
            speedup = row[kind]["tokens_per_second"] / base[kind]["tokens_per_second"]
            ideal = base[f"{kind}_flops"] / row[f"{kind}_flops"]
            row[kind].update(speedup=speedup, ideal_speedup=ideal, fraction_of_ideal=speedup / ideal)
        row["parameter_fraction_removed"] = 1 - row["parameters"] / base["parameters"]

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dense": dense_name,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "forward_shape": {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "generate_shape": {"batch_size": args.gen_batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
        "repeats": args.repeats,
        "pruned_layers": [layers.start, layers.stop],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds": round(elapsed, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "models": rows,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    f, g = result["forward_shape"], result["generate_shape"]
    lines = [
        f"Dense: {result['dense']} on {result['device']} ({result['dtype']}, {result['torch_threads']} torch threads, "
        f"load average {result['loadavg_before'][0]:.2f} → {result['loadavg_after'][0]:.2f}). Forward: batch "
        f"{f['batch_size']} × {f['seq_len']} tokens; generate: batch {g['batch_size']}, prompt {g['prompt_len']}, "
        f"{g['new_tokens']} new tokens (greedy, KV cache); median of {result['repeats']} interleaved repetitions.",
        "",
        "| model | params | removed | fwd tok/s | fwd speedup | FLOP ideal | of ideal | gen tok/s | gen speedup | gen ideal | of ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["models"].items():
        cells = [name, f"{row['parameters'] / 1e6:.1f}M", f"{100 * row['parameter_fraction_removed']:.1f}%"]
        for kind in ("forward", "generate"):
            if kind in row:
                r = row[kind]
                cells += [f"{r['tokens_per_second']:.0f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
                          f"{r['fraction_of_ideal']:.2f}"]
            else:
                cells += ["–"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n`{result['command']}`\n"


if __name__ == "__main__":
    main()
