"""Screen pruning variants quickly: one estimation pass, many plans, perplexity of each.

The benchmark (``scripts/benchmark.py``) runs every row as a whole job; this screen shares the
estimation that rows have in common, so that many scorer × allocation choices can be compared on a
CPU: the statistics of every scheme are estimated once on the calibration windows
(:func:`~hywia_lightning.core.pipeline.estimate`), and each variant is the pipeline's own steps after
it: :func:`~hywia_lightning.core.pipeline.plan_from_statistics` (score, allocate, select), the
refit of ``configs/prune_smollm2.yaml``'s reconstruction stage (its mode class, with its keys) on a
copy of the model, and perplexity. Its numbers are a screen: the rows that go into the docs are
re-run by the benchmark.

    python scripts/sweep_variants.py --targets 0.2 0.5 --out runs/sweep.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml

from hywia_lightning import GlobalAllocation, HyWIA, UniformAllocation, apply_plan
from hywia_lightning.core.allocation import PruningScope
from hywia_lightning.core.granularities import make_granularity
from hywia_lightning.core.pipeline import estimate, plan_from_statistics
from hywia_lightning.core.plan import count_parameters
from hywia_lightning.core.statistics import NEEDS
from hywia_lightning.core.structures import target_layers
from hywia_lightning.data.calibration import CalibrationData
from hywia_lightning.data.text_sources import read_text, token_ids
from hywia_lightning.evaluation.perplexity import chunk_tokens, perplexity
from hywia_lightning.fusion.modes import Fixed
from hywia_lightning.models.loading import load_causal_lm
from hywia_lightning.reconstruction.modes import reconstruction_mode

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "configs" / "prune_smollm2.yaml"  # whose reconstruction stage every refit variant uses

SCHEMES = ["element1", "element2", "vector", "vector2", "wanda", "fluctuation"]


def variants() -> list[dict]:
    """Each: a scorer, an allocation (``uniform``, or the ``group``/``kind``/``none`` standardization
    of a global one), a refit (``default``: the default job's reconstruction stage; ``none``),
    optionally ``heads_to_keep``."""
    pool = ["element1", "element2", "vector2", "fluctuation"]
    pair = ["element2", "fluctuation"]
    return [
        {"scorer": "element1", "allocation": "uniform", "refit": "default"},
        {"scorer": "element2", "allocation": "uniform", "refit": "default"},
        {"scorer": "fluctuation", "allocation": "uniform", "refit": "default"},
        {"scorer": "fluctuation", "allocation": "group", "refit": "default"},
        {"scorer": "fluctuation", "allocation": "kind", "refit": "default"},
        {"scorer": "element2", "allocation": "group", "refit": "default"},
        {"scorer": "element2", "allocation": "kind", "refit": "default"},
        {"scorer": "vector2", "allocation": "group", "refit": "default"},
        {"scorer": {"schemes": pool, "mode": "heuristic", "normalization": "group"}, "allocation": "group", "refit": "default"},
        {"scorer": {"schemes": pool, "mode": "heuristic", "normalization": "kind"}, "allocation": "kind", "refit": "default"},
        {"scorer": {"schemes": pool, "mode": "fixed", "normalization": "group"}, "allocation": "group", "refit": "default"},
        {"scorer": "fluctuation", "allocation": "group", "refit": "default"},
        {"scorer": "fluctuation", "allocation": "group", "refit": "none"},
        # 13..
        {"scorer": "fluctuation", "allocation": "none", "refit": "default"},
        {"scorer": "element2", "allocation": "none", "refit": "default"},
        {"scorer": {"schemes": pair, "mode": "heuristic"}, "allocation": "uniform", "refit": "default"},
        {"scorer": {"schemes": pair, "mode": "fixed"}, "allocation": "uniform", "refit": "default"},
        {"scorer": {"schemes": pool, "mode": "heuristic"}, "allocation": "uniform", "refit": "default"},
        {"scorer": {"schemes": pair, "mode": "heuristic", "normalization": "kind"}, "allocation": "kind", "refit": "default"},
        {"scorer": "fluctuation", "allocation": "uniform", "refit": "default", "heads_to_keep": 9},
        {"scorer": "fluctuation", "allocation": "none", "refit": "default", "heads_to_keep": 9},
    ]


def make_scorer(spec):
    if isinstance(spec, str):
        return make_granularity(spec)
    mode = Fixed({s: 1.0 for s in spec["schemes"]}) if spec["mode"] == "fixed" else spec["mode"]
    return HyWIA(spec["schemes"], mode, normalization=spec.get("normalization", "group"))


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
    lines = ["| scorer | widths | refit | PPL 20% | PPL 50% |", "|---|---|---|---:|---:|"]  # refit: the default's
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
    print(f"statistics in {time.perf_counter() - start:.0f}s", flush=True)
    refit = yaml.safe_load(DEFAULT_JOB.read_text())["reconstruction"]
    refit_mode = reconstruction_mode(refit.pop("mode"))
    dense_ppl = perplexity(model, chunks)
    print(f"dense perplexity {dense_ppl:.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = count_parameters(model)
    selected = variants() if args.only is None else [variants()[i] for i in args.only]
    identity = lambda tensor: tensor  # one process: nothing to sum
    for target in args.targets:
        for variant in selected:
            start = time.perf_counter()
            try:
                result = plan_from_statistics(model, layers, windows, statistics, make_scorer(variant["scorer"]),
                                              scope_of(variant, target), make_allocation(variant["allocation"]))
            except ValueError as error:  # a target this variant cannot reach
                print(json.dumps({**variant, "target": target, "skipped": str(error)[:200]}), flush=True)
                continue
            plan, widths = result.plan, result.widths
            pruned = copy.deepcopy(model)
            mode = refit_mode(**refit) if variant["refit"] != "none" else None
            if mode is not None:
                mode.before_slicing(pruned, plan, windows, identity)
            apply_plan(pruned, plan)
            if mode is not None:
                mode.after_slicing(pruned, plan, windows, identity)
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
