"""Run the benchmark rows (configs/bench/*.yaml, ../shared/BENCHMARK.md) and tabulate them.

    python scripts/benchmark.py                      # every row
    python scripts/benchmark.py --rows dense element1_20

Each row runs as ``python main.py fit --config configs/bench/<row>.yaml`` in its own process; its
``report.json`` is collected into ``<out>/results.json`` and the Markdown table ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "configs" / "bench"


def run_row(row: str, runs_dir: Path, data_root: str | None) -> dict:
    root = runs_dir / row
    command = [sys.executable, "main.py", "fit", "--config", str(BENCH / f"{row}.yaml"),
               "--trainer.default_root_dir", str(root)]
    if data_root:
        command += ["--data.init_args.source", f"{data_root}/wikitext-2/valid.txt"]
    start = time.perf_counter()
    log = root.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    report = json.loads((root / "export" / "report.json").read_text())
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["command"] = " ".join(command[1:])
    return report


def markdown(results: dict[str, dict]) -> str:
    dense = results.get("dense", {}).get("perplexity", {}).get("value")
    lines = [
        "| row | params | removed | WikiText-2 PPL | × dense | estimation s | pruning s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        pruning = r.get("pruning", {})
        ppl = r["perplexity"]["value"]
        ratio = f"{ppl / dense:.2f}" if dense else "–"
        seconds = r.get("seconds", {})
        lines.append(
            f"| {row} | {r['model']['params']:,} | {100 * pruning.get('fraction_removed', 0):.2f}% | {ppl:.2f} | "
            f"{ratio} | {seconds.get('estimation', 0):.1f} | {seconds.get('pruning', 0):.2f} | "
            f"{r['memory']['peak_rss_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help="row names (default: every configs/bench/*.yaml, dense first)")
    parser.add_argument("--out", default="docs/benchmark", help="folder for results.json and results.md")
    parser.add_argument("--runs", default="runs/bench", help="folder for each row's run")
    parser.add_argument("--data-root", help="folder holding wikitext-2/ (default: the configs' ../shared/data)")
    args = parser.parse_args()
    rows = args.rows or sorted((p.stem for p in BENCH.glob("*.yaml")), key=lambda r: (r != "dense", r))
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for row in rows:
        print(f"[benchmark] {row} ...", flush=True)
        results[row] = run_row(row, ROOT / args.runs, args.data_root)
        print(f"[benchmark] {row}: PPL {results[row]['perplexity']['value']:.2f} in {results[row]['wall_seconds']} s", flush=True)
        ordered = dict(sorted(results.items(), key=lambda kv: (kv[0] != "dense", kv[0])))
        results_path.write_text(json.dumps(ordered, indent=1) + "\n")
        (out / "results.md").write_text(
            "# Benchmark results\n\nProduced by `python scripts/benchmark.py` (protocol: ../shared/BENCHMARK.md; "
            "bundled SmolLM2-135M-Instruct, CPU, 32×128-token WikiText-2 valid calibration windows, "
            "layers 4..27, perplexity on the first 256×128 tokens of WikiText-2 test).\n\n" + markdown(ordered)
        )


if __name__ == "__main__":
    main()
