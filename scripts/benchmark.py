"""Run the benchmark rows (configs/bench/*.yaml, ../shared/BENCHMARK.md) and tabulate them.

    python scripts/benchmark.py                             # every row, perplexity and zero-shot
    python scripts/benchmark.py --rows dense element1_20 --zeroshot-limit 0

Each row runs as ``python main.py fit --config configs/bench/<row>.yaml`` in its own process; its
``report.json`` is collected into ``<out>/results.json`` and the Markdown table ``<out>/results.md``.
Zero-shot accuracy (PIQA and ARC-Easy through lm-eval, the first ``--zeroshot-limit`` items) is
measured on each row's export afterwards, in this process, as a plain transformers model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "configs" / "bench"


def run_row(row: str, runs_dir: Path, data_root: str | None) -> dict:
    root = runs_dir / row
    command = [sys.executable, "main.py", "fit", "--config", str(BENCH / f"{row}.yaml"),
               "--trainer.default_root_dir", str(root)]
    if data_root != "../shared/data":
        command += ["--data.init_args.source", f"{data_root}/wikitext-2/valid.txt"]
    start = time.perf_counter()
    log = root.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return collect_row(row, runs_dir, wall_seconds=round(time.perf_counter() - start, 1))


def collect_row(row: str, runs_dir: Path, wall_seconds: float | None = None) -> dict:
    """The report of a row's finished run (``python main.py fit --config configs/bench/<row>.yaml``)."""
    report = json.loads((runs_dir / row / "export" / "report.json").read_text())
    report["wall_seconds"] = wall_seconds
    report["command"] = f"main.py fit --config {(BENCH / f'{row}.yaml').relative_to(ROOT)}"
    return report


ZEROSHOT_TASKS = ["piqa", "arc_easy"]


def zeroshot_row(export_dir: Path, data_dir: str, limit: int | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hywia_lightning.evaluation.zeroshot import evaluate_zeroshot

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    start = time.perf_counter()
    scores = evaluate_zeroshot(model, tokenizer, ZEROSHOT_TASKS, data_dir, limit, batch_size=16)
    return {"limit": limit, "seconds": round(time.perf_counter() - start, 1), **scores}


def _accuracy(r: dict, task: str) -> str:
    score = r.get("zeroshot", {}).get(task)
    return f"{100 * score['acc']:.1f} (n={score['items']})" if score else "–"


def markdown(results: dict[str, dict]) -> str:
    dense = results.get("dense", {}).get("perplexity", {}).get("value")
    lines = [
        "| row | params | removed | WikiText-2 PPL | × dense | PIQA acc | ARC-e acc | estimation s | "
        "reconstruction s | recovery s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        pruning = r.get("pruning", {})
        ppl = r["perplexity"]["value"]
        ratio = f"{ppl / dense:.2f}" if dense else "–"
        seconds = r.get("seconds", {})
        lines.append(
            f"| {row} | {r['model']['params']:,} | {100 * pruning.get('fraction_removed', 0):.2f}% | {ppl:.2f} | "
            f"{ratio} | {_accuracy(r, 'piqa')} | {_accuracy(r, 'arc_easy')} | {seconds.get('estimation', 0):.1f} | "
            f"{seconds.get('reconstruction', 0):.1f} | {seconds.get('recovery', 0):.1f} | {r['memory']['peak_rss_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# the default configuration and one change each (scripts/make_bench_configs.py's ABLATIONS), and the
# peer measured by its own code on the same tokens (../shared/BENCHMARK.md)
CHANGES = {  # label of each one-component change, shared by the tables below
    "heuristic": "HyWIA heuristic fusion (element2 front, fluctuation back)",
    "fixed": "HyWIA fixed equal blend (element2 + fluctuation)",
    "learned": "HyWIA learned fusion attention (element2 + fluctuation)",
    "pool4": "HyWIA heuristic over element1 + element2 + vector2 + fluctuation",
    "compensated": "HyWIA compensated fusion of wanda + fluctuation + obs",
    "global": "widths: global (FLAP's standardized ranking)",
    "nointercept": "refit without intercept",
    "independent": "refit independent (every layer on dense inputs)",
}
SINGLES = {
    "element2": "element2 alone", "element1": "element1 alone", "vector": "vector alone", "vector2": "vector2 alone",
    "wanda": "wanda alone", "obs": "obs alone (greedy structured OBS: the error the refit leaves)",
}
ABLATION_ROWS = {
    "hywia_default": "**default**: HyWIA compensated fusion of wanda + fluctuation (per group the blend the refit recovers "
                     "best), uniform widths, sequential LS refit with intercept anchored on the pruned weights, its damping "
                     "chosen per structure from 0.01..3 by 4 folds of held-out windows",
    "hywia_damping01": "refit damping fixed at 0.1 for every structure (the previous default)",
    "hywia_damping1": "refit damping fixed at 1 for every structure",
    **{f"hywia_default_{change}": CHANGES[change] for change in ("heuristic", "fixed")},
    "hywia_default_learned": "HyWIA learned fusion attention over wanda + fluctuation (`mode: learned`, the LM loss)",
    "hywia_default_learnedkl": "HyWIA learned fusion attention trained against the KL from the unmasked model "
                               "(`objective: kl`)",
    **{f"{scheme}_default": SINGLES[scheme] for scheme in ("wanda", "obs", "element2", "element1", "vector2")},
    "fluctuation_default": "fluctuation alone",
}
# the changes measured with the previous default's refit, its damping fixed at 0.1
DAMPING01_ROWS = {
    "hywia_damping01": "**previous default**: the default above with the refit's damping fixed at 0.1",
    "fluctuation_damping01": "fluctuation alone (the default before that; the rows below change one component of it)",
    **{f"hywia_damping01_{change}": label for change, label in CHANGES.items()},
    **{f"{scheme}_damping01": label for scheme, label in SINGLES.items()},
    "hywia_default_norecon": "no refit",
}
# the same changes with the ridge refit before that (hywia_default_ridge)
RIDGE_ROWS = {
    "hywia_default_ridge": "**ridge refit** (damping 0.01): fluctuation, uniform widths, sequential, intercept",
    **{f"hywia_ridge_{change}": CHANGES[change] for change in ("heuristic", "fixed", "nointercept", "independent")},
    "element2_ridge": SINGLES["element2"],
}
FLAP = {"20": (89.66, 49.3), "50": (504.31, 41.8)}  # PPL, mean PIQA/ARC-Easy acc (../shared/BENCHMARK.md)


def _mean_accuracy(r: dict | None) -> str:
    scores = (r or {}).get("zeroshot", {})
    if not all(task in scores for task in ZEROSHOT_TASKS):
        return "–"
    return f"{100 * sum(scores[t]['acc'] for t in ZEROSHOT_TASKS) / len(ZEROSHOT_TASKS):.1f}"


def ablation_table(results: dict[str, dict], rows: dict[str, str] = ABLATION_ROWS) -> str:
    """What each component of the default adds: one row per change, both targets side by side."""
    lines = ["| configuration | PPL 20% | mean acc 20% | PPL 50% | mean acc 50% |", "|---|---:|---:|---:|---:|"]
    for row, label in rows.items():
        cells = []
        for target in ("20", "50"):
            r = results.get(f"{row}_{target}")
            cells += [f"{r['perplexity']['value']:.2f}" if r else "–", _mean_accuracy(r)]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| FLAP, its own code (../shared/BENCHMARK.md) | " + " | ".join(
        f"{FLAP[t][0]:.2f} | {FLAP[t][1]:.1f}" for t in ("20", "50")) + " |")
    return "\n".join(lines) + "\n"


# the default configuration calibrated on each source (scripts/make_bench_configs.py's CALIBRATIONS;
# hywia_default itself is the WikiText-2 valid row), all judged on the same WikiText-2 test tokens
CALIBRATION_ROWS = {
    "hywia_default_cal_pydocs": "`builtin:python-docs/train` (the previous offline default)",
    "hywia_default_cal_generated": "`generated`: 32 samples of 128 tokens from the dense model",
    "hywia_default_cal_mix": "`[generated, builtin:python-docs/train]`: 16 windows of each",
    "hywia_default_cal_generated128": "**`generated`, 128 windows: the offline default** (configs/prune_smollm2.yaml)",
    "hywia_default_cal_chat128": "`generated` conversations (`generation.conversation`), 128 windows",
    "hywia_default": "WikiText-2 `valid.txt` (the protocol's calibration: the test text's corpus)",
}
CALIBRATION_COMMAND = "python scripts/benchmark.py --rows " + " ".join(
    f"{row}_{target}" for row in CALIBRATION_ROWS for target in ("20", "50"))


def calibration_table(results: dict[str, dict]) -> str:
    """Which text to calibrate on: the default configuration per source, both targets side by side."""
    dense = results.get("dense", {}).get("perplexity", {}).get("value")
    lines = ["| calibration source | PPL 20% | × dense | PIQA | ARC-e | mean acc | PPL 50% | × dense | PIQA | ARC-e | mean acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row, label in CALIBRATION_ROWS.items():
        cells = []
        for target in ("20", "50"):
            r = results.get(f"{row}_{target}")
            ppl = r["perplexity"]["value"] if r else None
            scores = (r or {}).get("zeroshot", {})
            cells += [f"{ppl:.2f}" if ppl else "–", f"{ppl / dense:.2f}" if ppl and dense else "–",
                      *(f"{100 * scores[t]['acc']:.1f}" if t in scores else "–" for t in ZEROSHOT_TASKS), _mean_accuracy(r)]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# per-layer widths of the default configuration against the KL to the dense model (issue: quality on the tasks)
WIDTH_ROWS = {
    "hywia_default_uniform": "uniform widths (every pruned layer loses the same share)",
    "hywia_default_search": "widths searched against the KL to the dense model (`width_search`)",
    "hywia_default_uniform_cal_valid128": "uniform widths, 128 calibration windows instead of 32 (the same KL windows)",
    "hywia_default_uniform_cal_valid512": "uniform widths, 512 calibration windows instead of 32 (the same KL windows)",
    "hywia_default_uniform_heads9": "uniform widths, all 9 query heads kept in every layer: the MLPs take the whole cut "
                                    "(FLAP's shape at 20%)",
    "hywia_default_uniform_kvgroups": "uniform widths, attention losing whole KV groups (`attention_unit: kv_groups`) "
                                      "instead of query heads within each group",
    "hywia_default_kljudge": "uniform widths, the refit's damping chosen by the KL on held-out windows 0..7 "
                             "(`choose_by: kl`) instead of the output error on held-out folds",
}
WIDTH_TARGETS = ("20", "30", "50")
UNSEEN_FROM = 16  # the search's judge_windows (and at least the refit's kl_windows): windows 16..31 are never judged on


def _kl(r: dict | None, first: int = 0) -> str:
    """The mean KL to the dense model over the row's held-out windows from ``first`` on."""
    distillation = (r or {}).get("distillation", {})
    per_window = distillation.get("kl_per_window")
    if per_window:
        return f"{sum(per_window[first:]) / len(per_window[first:]):.4f}"
    value = None  # a run recorded before kl_per_window: its overall KL, and its search's unseen one
    if first == 0:
        value = distillation.get("kl")
    elif distillation.get("windows", 0) - distillation.get("unseen_windows", 0) == first:
        value = distillation.get("kl_unseen_by_search")  # rows since kl_unseen always have kl_per_window
    return f"{value:.4f}" if value is not None else "–"


def _full_accuracy(r: dict | None) -> str:
    scores = (r or {}).get("zeroshot_full", {})
    if not all(task in scores for task in ZEROSHOT_TASKS):
        return "–"
    return " / ".join(f"{100 * scores[t]['acc']:.1f}" for t in ZEROSHOT_TASKS) + \
        f" ({100 * sum(scores[t]['acc'] for t in ZEROSHOT_TASKS) / len(ZEROSHOT_TASKS):.1f})"


def widths_table(results: dict[str, dict]) -> str:
    """Uniform against searched widths at every target: perplexity, accuracy (n=500 and full sets),
    the KL on the 32 held-out windows and on the 16 of them the search never judged on."""
    lines = ["| widths | target | PPL | mean acc (n=500) | PIQA / ARC-e full sets (mean) | KL (32 windows) | KL (16 unseen) | search s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, label in WIDTH_ROWS.items():
        for target in WIDTH_TARGETS:
            r = results.get(f"{row}_{target}")
            if not r:
                continue
            lines.append(f"| {label} | {target}% | {r['perplexity']['value']:.2f} | {_mean_accuracy(r)} | "
                         f"{_full_accuracy(r)} | {_kl(r)} | {_kl(r, UNSEEN_FROM)} | "
                         f"{r.get('seconds', {}).get('width_search', 0):.0f} |")
    return "\n".join(lines) + "\n"


# the default pruning, then LoRA recovery (issue: recovery by distillation): row -> what recovered it
RECOVERY_ROWS = {
    "hywia_default": "none (the pruned model)",
    "hywia_default_lora": "`lm` on WikiText-2 valid.txt windows (the test text's corpus; lr 3e-4)",
    "hywia_default_lm": "`lm` on 384 windows the dense model sampled",
    "hywia_default_distill_wikitext": "`kl` on WikiText-2 valid.txt windows (a diagnostic: the test text's corpus, "
                                      "val KL on its own 16)",
    "hywia_default_distill": "**`kl` (distillation from the dense model)** on the same 384 sampled windows",
    "hywia_default_distill_r32": "`kl`, LoRA rank 32 (alpha 64) instead of 8, on the same windows",
    "hywia_default_distill_text1600": "`kl` on 1,616 sampled windows (each seen once; val KL on its own 16)",
    "hywia_default_distill_chat": "`kl` on 384 sampled conversations (the chat template, Magpie; val KL on its own 16)",
    "hywia_default_distill_steps20": "`kl` on the same 384 sampled windows, 20 steps instead of 200",
}
RECOVERY_TARGETS = ("20", "50")


def _val_kl(r: dict) -> str:
    """The held-out KL to the dense model before and after the recovery (its validation windows)."""
    recovery = r.get("recovery", {})
    curve = recovery.get("val_kl")
    return f"{recovery['val_kl_before']:.3f} → {curve[-1][1]:.3f}" if curve and "val_kl_before" in recovery else "–"


def recovery_table(results: dict[str, dict]) -> str:
    """The default pruning with no recovery and with each recovery: PPL, accuracy, held-out KL, cost."""
    lines = ["| recovery | target | PPL | PIQA / ARC-e (n=500) | mean acc (n=500) | PIQA / ARC-e full sets (mean) | "
             "val KL before → after | recovery s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, label in RECOVERY_ROWS.items():
        for target in RECOVERY_TARGETS:
            r = results.get(f"{row}_{target}")
            if not r:
                continue
            scores = r.get("zeroshot", {})
            each = " / ".join(f"{100 * scores[t]['acc']:.1f}" for t in ZEROSHOT_TASKS) if all(t in scores for t in ZEROSHOT_TASKS) else "–"
            lines.append(f"| {label} | {target}% | {r['perplexity']['value']:.2f} | {each} | {_mean_accuracy(r)} | "
                         f"{_full_accuracy(r)} | {_val_kl(r)} | {r.get('seconds', {}).get('recovery', 0):.0f} |")
    return "\n".join(lines) + "\n"


def summarized(row: dict) -> dict:
    """A row without its per-structure details (each refit's errors, each group's score quantiles, the
    width search's curves), which stay in the run's own ``report.json``: the results keep what the
    tables and the docs cite, and of a damping chosen by held-out windows how many structures of each
    kind chose each value."""
    row = dict(row)
    recon = row.get("reconstruction")
    if recon and "layers" in recon:
        recon = row["reconstruction"] = dict(recon)
        layers = recon.pop("layers")
        if isinstance(recon.get("damping"), list):
            chosen: dict[str, Counter] = {}
            for key, layer in layers.items():  # keys like layers.4.mlp
                chosen.setdefault(key.rsplit(".", 1)[-1], Counter())[str(layer["damping"])] += 1
            recon["chosen_damping"] = {kind: dict(sorted(c.items())) for kind, c in chosen.items()}
    if "width_search" in row:  # each round's measured curves stay in the run's report.json
        row["width_search"] = {**row["width_search"], "rounds": [{k: v for k, v in r.items() if k != "curves"}
                                                                 for r in row["width_search"]["rounds"]]}
    if "recovery" in row:  # the per-step training curves stay in the run's report.json; validation's are kept
        row["recovery"] = {k: v for k, v in row["recovery"].items() if k not in ("loss_curve", "kl_curve", "lm_curve")}
    if "groups" in row.get("importance", {}):
        row["importance"] = {k: v for k, v in row["importance"].items() if k != "groups"}
    return row


def write_results(results: dict[str, dict], out: Path) -> None:
    """``results.json`` (every row :func:`summarized`) and the Markdown table, dense first."""
    ordered = {row: summarized(r) for row, r in sorted(results.items(), key=lambda kv: (kv[0] != "dense", kv[0]))}
    (out / "results.json").write_text(json.dumps(ordered, indent=1) + "\n")
    (out / "results.md").write_text(
        "# Benchmark results\n\nProduced by `python scripts/benchmark.py` (protocol: ../shared/BENCHMARK.md; "
        "bundled SmolLM2-135M-Instruct, CPU, 32×128-token WikiText-2 valid calibration windows, "
        "layers 4..27, perplexity on the first 256×128 tokens of WikiText-2 test, zero-shot acc on the first "
        "n items of PIQA and ARC-Easy through lm-eval on each row's export; – = not measured yet: "
        "`python scripts/benchmark.py --zeroshot-only --rows ROW...` adds them).\n\n"
        + markdown(ordered)
        + "\n## Per-layer widths: uniform or searched against the KL to the dense model\n\nThe default "
        "configuration with uniform widths and with widths searched against the KL (docs/hywia.md); the KL is "
        "measured on 32 held-out `valid.txt` windows, disjoint from the calibration windows (the last 32 of the "
        "seed's window order), and on the 16 of them the search never judged a proposal on. Produced by "
        "`python scripts/benchmark.py --rows " + " ".join(f"{row}_{t}" for row in WIDTH_ROWS for t in WIDTH_TARGETS
                                                         if (BENCH / f"{row}_{t}.yaml").is_file())
        + "` (full sets: `--full-sets --zeroshot-only`).\n\n"
        + widths_table(ordered)
        + "\n## Recovery: LoRA by distillation or by the language-model loss\n\nThe default pruning (uniform "
        "widths) followed by 200 LoRA steps of 8 × 128 tokens (r=8 on every projection, AdamW lr 2e-3, 10-step "
        "warm-up); `kl`: the KL from the dense model at temperature 1, `lm`: the next-token loss; val KL: on the "
        "16 held-out recovery windows. Produced by `python scripts/benchmark.py --rows "
        + " ".join(f"{row}_{t}" for row in list(RECOVERY_ROWS)[1:] for t in RECOVERY_TARGETS
                   if (BENCH / f"{row}_{t}.yaml").is_file()) + "` (full sets: `--full-sets --zeroshot-only`).\n\n"
        + recovery_table(ordered)
        + "\n## Ablations of the default configuration\n\nMean acc = mean of PIQA and ARC-Easy acc (n=500). "
        "Each row changes one component of `hywia_default` (`configs/bench/<row>_<target>.yaml`).\n\n"
        + ablation_table(ordered)
        + "\nMeasured with the previous default's refit, its damping fixed at 0.1; below `fluctuation_damping01` each "
        "row changes one component of fluctuation alone, the default they were measured against:\n\n"
        + ablation_table(ordered, DAMPING01_ROWS)
        + "\nThe same changes with the ridge refit before that (toward zero, damping 0.01):\n\n"
        + ablation_table(ordered, RIDGE_ROWS)
        + "\n## Calibration sources of the default configuration\n\nThe default configuration (`hywia_default`) "
        "calibrated on each source (32 windows of 128 tokens unless the row says, seed 0), judged on text none of "
        "them was calibrated on, except the WikiText-2 row (docs/benchmark/calibration.md has more variants): perplexity on the first 256×128 tokens of WikiText-2 test, PIQA and "
        f"ARC-Easy acc (n=500). Produced by `{CALIBRATION_COMMAND}`.\n\n"
        + calibration_table(ordered)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help="row names (default: every configs/bench/*.yaml, dense first)")
    parser.add_argument("--out", default="docs/benchmark", help="folder for results.json and results.md")
    parser.add_argument("--runs", default="runs/bench", help="folder for each row's run")
    parser.add_argument("--data-root", default="../shared/data", help="folder holding wikitext-2/ and zeroshot/")
    parser.add_argument("--zeroshot-limit", type=int, default=500, help="items per zero-shot task (0: skip zero-shot)")
    parser.add_argument("--full-sets", action="store_true",
                        help="zero-shot on every item of PIQA (1,838) and ARC-Easy (2,376), kept as zeroshot_full")
    parser.add_argument("--zeroshot-only", action="store_true",
                        help="run no row; add zero-shot scores to rows already run (in --runs)")
    args = parser.parse_args()
    rows = args.rows or sorted((p.stem for p in BENCH.glob("*.yaml")), key=lambda r: (r != "dense", r))
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for row in rows:
        if not args.zeroshot_only:
            print(f"[benchmark] {row} ...", flush=True)
            results[row] = run_row(row, ROOT / args.runs, args.data_root)
            print(f"[benchmark] {row}: PPL {results[row]['perplexity']['value']:.2f} in {results[row]['wall_seconds']} s", flush=True)
        elif row not in results:
            results[row] = collect_row(row, ROOT / args.runs)
        if args.zeroshot_limit > 0 or args.full_sets:
            key = "zeroshot_full" if args.full_sets else "zeroshot"
            results[row][key] = zeroshot_row(Path(results[row]["model"]["export_dir"]), f"{args.data_root}/zeroshot",
                                             None if args.full_sets else args.zeroshot_limit)
            print(f"[benchmark] {row}: {key} {results[row][key]}", flush=True)
        write_results(results, out)


if __name__ == "__main__":
    main()
