"""Screen pruning variants quickly: one estimation pass, many plans, perplexity of each.

The benchmark (``scripts/benchmark.py``) runs every row as a whole job; this screen shares the
work that rows have in common, so that dozens of scorer × allocation × compensation choices can be
compared in minutes on a CPU: the statistics of every scheme are estimated once on the calibration
windows, the dense ``X Xᵀ`` of every output projection is taken once, and each variant only scores,
allocates, slices a copy of the model, refits it and measures perplexity. Its numbers are a screen:
the rows that go into the docs are re-run by the benchmark.

    python scripts/sweep_variants.py --targets 0.2 0.5 --out runs/sweep.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hywia_lightning import GlobalAllocation, HyWIA, UniformAllocation, apply_plan  # noqa: E402
from hywia_lightning.core.allocation import PruningScope  # noqa: E402
from hywia_lightning.core.granularities import make_granularity  # noqa: E402
from hywia_lightning.core.pipeline import estimate  # noqa: E402
from hywia_lightning.core.plan import count_parameters, make_plan  # noqa: E402
from hywia_lightning.core.scoring import ScoringContext  # noqa: E402
from hywia_lightning.core.slicing import record_layer_widths  # noqa: E402
from hywia_lightning.core.statistics import NEEDS  # noqa: E402
from hywia_lightning.core.structures import discover_structures  # noqa: E402
from hywia_lightning.core.structures import target_layers  # noqa: E402
from hywia_lightning.core.unit_groups import unit_groups  # noqa: E402
from hywia_lightning.data.calibration import CalibrationData  # noqa: E402
from hywia_lightning.data.text_sources import read_text, token_ids  # noqa: E402
from hywia_lightning.evaluation.perplexity import chunk_tokens, perplexity  # noqa: E402
from hywia_lightning.models.loading import load_causal_lm  # noqa: E402
from hywia_lightning.reconstruction.layer_stream import LayerStream  # noqa: E402
from hywia_lightning.reconstruction.least_squares import RefitStatistics, dense_grams, solve_refit  # noqa: E402
from hywia_lightning.reconstruction.modes import assign, kept_inputs, output_projection, pruned_structures  # noqa: E402

SCHEMES = ["element1", "element2", "vector", "vector2", "wanda", "fluctuation"]


def variants() -> list[dict]:
    """Each: a scorer, an allocation (``uniform``, or the ``group``/``kind``/``none`` standardization
    of a global one), a compensation (``none``, ``plain`` least squares, ``intercept``: with a bias),
    optionally ``heads_to_keep``."""
    pool = ["element1", "element2", "vector2", "fluctuation"]
    pair = ["element2", "fluctuation"]
    return [
        {"scorer": "element1", "allocation": "uniform", "refit": "intercept"},
        {"scorer": "element2", "allocation": "uniform", "refit": "intercept"},
        {"scorer": "fluctuation", "allocation": "uniform", "refit": "intercept"},
        {"scorer": "fluctuation", "allocation": "group", "refit": "intercept"},
        {"scorer": "fluctuation", "allocation": "kind", "refit": "intercept"},
        {"scorer": "element2", "allocation": "group", "refit": "intercept"},
        {"scorer": "element2", "allocation": "kind", "refit": "intercept"},
        {"scorer": "vector2", "allocation": "group", "refit": "intercept"},
        {"scorer": {"schemes": pool, "mode": "heuristic", "normalization": "group"}, "allocation": "group", "refit": "intercept"},
        {"scorer": {"schemes": pool, "mode": "heuristic", "normalization": "kind"}, "allocation": "kind", "refit": "intercept"},
        {"scorer": {"schemes": pool, "mode": "fixed", "normalization": "group"}, "allocation": "group", "refit": "intercept"},
        {"scorer": "fluctuation", "allocation": "group", "refit": "plain"},
        {"scorer": "fluctuation", "allocation": "group", "refit": "none"},
        # 13..
        {"scorer": "fluctuation", "allocation": "none", "refit": "intercept"},
        {"scorer": "element2", "allocation": "none", "refit": "intercept"},
        {"scorer": {"schemes": pair, "mode": "heuristic"}, "allocation": "uniform", "refit": "intercept"},
        {"scorer": {"schemes": pair, "mode": "fixed"}, "allocation": "uniform", "refit": "intercept"},
        {"scorer": {"schemes": pool, "mode": "heuristic"}, "allocation": "uniform", "refit": "intercept"},
        {"scorer": {"schemes": pair, "mode": "heuristic", "normalization": "kind"}, "allocation": "kind", "refit": "intercept"},
        {"scorer": "fluctuation", "allocation": "uniform", "refit": "intercept", "heads_to_keep": 9},
        {"scorer": "fluctuation", "allocation": "none", "refit": "intercept", "heads_to_keep": 9},
    ]


def make_scorer(spec):
    if isinstance(spec, str):
        return make_granularity(spec)
    weights = {s: 1.0 for s in spec["schemes"]} if spec["mode"] == "fixed" else None
    return HyWIA(spec["schemes"], spec["mode"], weights, normalization=spec.get("normalization", "group"))


def make_allocation(name: str):
    return UniformAllocation() if name == "uniform" else GlobalAllocation(standardize=name)


def scope_of(variant: dict, target: float) -> PruningScope:
    return PruningScope(target, heads_to_keep=variant.get("heads_to_keep"))


def label(spec) -> str:
    if isinstance(spec, str):
        return spec
    return f"HyWIA {spec['mode']} ({' + '.join(spec['schemes'])}; {spec.get('normalization', 'group')})"


def table(path: Path) -> str:
    """The screen's rows as Markdown: perplexity at each target, ×dense in brackets."""
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        allocation = "group" if r["allocation"] == "global" else r["allocation"]  # the first screen's name for it
        heads = f", heads_to_keep {r['heads_to_keep']}" if r.get("heads_to_keep") else ""
        key = (label(r["scorer"]), ("uniform" if allocation == "uniform" else f"global ({allocation})") + heads, r["refit"])
        rows.setdefault(key, {})[r["target"]] = r
    lines = ["| scorer | widths | refit | PPL 20% | PPL 50% |", "|---|---|---|---:|---:|"]
    for key, by_target in sorted(rows.items(), key=lambda kv: kv[1].get(0.2, kv[1].get(0.5))["ppl"]):
        cells = [f"{by_target[t]['ppl']:.2f} ({by_target[t]['ppl'] / by_target[t]['dense_ppl']:.2f}×)" if t in by_target
                 else "–" for t in (0.2, 0.5)]
        lines.append("| " + " | ".join(key + tuple(cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", help="print the Markdown table of a finished screen's JSON lines, run nothing")
    parser.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    parser.add_argument("--calibration", default=str(ROOT.parent / "shared/data/wikitext-2/valid.txt"))
    parser.add_argument("--evaluation", default=str(ROOT.parent / "shared/data/wikitext-2/test.txt"))
    parser.add_argument("--num-chunks", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--only", type=int, nargs="*", help="indices of variants() to run")
    parser.add_argument("--out", default="runs/sweep.jsonl")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)), end="")
        return

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(args.model)
    data = CalibrationData(args.calibration, num_windows=32, seq_len=128, seed=0)
    data.attach(tokenizer, model)
    windows = data.windows()
    chunks = chunk_tokens(token_ids(tokenizer, read_text(args.evaluation, "evaluation")), 128, args.num_chunks)
    layers = target_layers(model, 4, -2)
    start = time.perf_counter()
    statistics = estimate(model, layers, windows, frozenset(NEEDS), "query_heads")
    groups = unit_groups(layers, "query_heads", model.config.num_hidden_layers, statistics)
    projections = {}
    for s in layers:
        projections[(s.layer, "attention")] = s.attention.o_proj
        projections[(s.layer, "mlp")] = s.mlp.down_proj
    grams, sums, tokens = {}, {}, windows.numel()
    stream = LayerStream(model, windows, layers[0].layer, layers[-1].layer, batch_size=16)
    while stream.next <= layers[-1].layer:  # the dense model's X Xᵀ, one layer at a time
        layer = stream.next
        layer_grams, layer_sums = dense_grams({k: p for k, p in projections.items() if k[0] == layer}, stream.advance)
        grams.update(layer_grams)
        sums.update(layer_sums)
    print(f"statistics and grams in {time.perf_counter() - start:.0f}s", flush=True)
    dense_ppl = perplexity(model, chunks)
    print(f"dense perplexity {dense_ppl:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = count_parameters(model)
    selected = variants() if args.only is None else [variants()[i] for i in args.only]
    for target in args.targets:
        for variant in selected:
            scope = scope_of(variant, target)
            start = time.perf_counter()
            allocation = make_allocation(variant["allocation"])
            scorer = make_scorer(variant["scorer"])
            context = ScoringContext(model, layers, scope, windows, lambda s: allocation.widths(layers, total, scope, s))
            try:
                scores = scorer.score_groups(groups, context).scores
                widths = allocation.widths(layers, total, scope, scores)
            except ValueError as error:  # a target this variant cannot reach
                print(json.dumps({**variant, "target": target, "skipped": str(error)[:200]}), flush=True)
                continue
            plan = make_plan(layers, scores, widths, "query_heads")
            pruned = copy.deepcopy(model)
            structures = discover_structures(pruned)
            results = {}
            if variant["refit"] != "none":
                for key in pruned_structures(plan):
                    keep = kept_inputs(structures[key.layer], plan, key.kind)
                    stats = RefitStatistics.from_dense_gram(grams[(key.layer, key.kind)], sums[(key.layer, key.kind)], keep, tokens)
                    proj = output_projection(structures[key.layer], key.kind)
                    results[key] = solve_refit(proj.weight, proj.weight[:, keep], stats, 0.01, str(key),
                                               intercept=variant["refit"] == "intercept")
            apply_plan(pruned, plan)
            structures = discover_structures(pruned)
            for key, result in results.items():
                assign(output_projection(structures[key.layer], key.kind), result)
            record_layer_widths(pruned)
            row = {
                **variant, "target": target, "params": count_parameters(pruned),
                "removed": 1 - count_parameters(pruned) / total, "ppl": perplexity(pruned, chunks), "dense_ppl": dense_ppl,
                "heads": [widths[s.layer].num_heads for s in layers],
                "channels": [widths[s.layer].num_channels for s in layers],
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps({k: row[k] for k in ("scorer", "allocation", "refit", "target", "ppl", "seconds")}), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
