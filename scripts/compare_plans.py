"""Do two versions of the code prune alike? Runs jobs at a commit and in this checkout, then compares.

    python scripts/compare_plans.py --commit 356c022 --configs configs/prune_smollm2.yaml configs/bench/hywia_default_20.yaml
    python scripts/compare_plans.py --commit 356c022 --configs ... --weights   # also the exported weights
    python scripts/compare_plans.py --commit 356c022 --configs ... --reuse     # the commit's runs already in --out

Each config runs as ``python main.py fit --config CONFIG --perplexity null`` (and without the refit
and with no export of weights unless ``--weights``) in a git worktree of ``--commit`` beside this
checkout (so that relative data paths such as ``../shared/data`` resolve alike) and here, each run
in its own folder. Writes a JSON line per config (``pruning_plan.json`` identical or not; with
``--weights`` the largest absolute difference between the exported tensors) to ``--out`` and prints
a Markdown table. A refactoring that keeps the method must keep every plan and every weight.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(checkout: Path, config: str, folder: Path, weights: bool) -> float:
    """One job; its seconds. Without ``weights`` only the plan is made (no refit, no weights written)."""
    command = [sys.executable, "main.py", "fit", "--config", config, "--perplexity", "null", "--zeroshot", "null",
               "--trainer.default_root_dir", str(folder), "--trainer.logger", "false"]
    if not weights:
        command += ["--reconstruction", "null"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config} failed in {checkout}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if first.keys() != second.keys() or any(first[k].shape != second[k].shape for k in first):
        return float("inf")
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--configs", nargs="+", required=True, help="config paths relative to the repository")
    parser.add_argument("--weights", action="store_true", help="refit and export too, and compare the weights")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare_plans")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the commit's runs already in --out (compare a later checkout against them)")
    args = parser.parse_args()
    worktree = ROOT.parent / f"compare-{args.commit[:12]}"
    if not worktree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.commit], cwd=ROOT, check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs:
        name = Path(config).stem
        folders = {"then": args.out / "then" / name, "now": args.out / "now" / name}
        seconds = {key: run(checkout, config, folders[key], args.weights)
                   for key, checkout in (("then", worktree), ("now", ROOT))
                   if not (key == "then" and args.reuse and (folders[key] / "export" / "pruning_plan.json").is_file())}
        plans = [(folders[key] / "export" / "pruning_plan.json").read_bytes() for key in ("then", "now")]
        row = {"config": config, "commit": args.commit, "same_plan": plans[0] == plans[1],
               "seconds": {k: round(v, 1) for k, v in seconds.items()}}
        if args.weights:
            row["max_abs_weight_difference"] = max_weight_difference(folders["then"] / "export", folders["now"] / "export")
        rows.append(row)
        with (args.out / "comparison.jsonl").open("a") as log:
            log.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n| config | plan identical to {args.commit} | max abs weight difference |\n|---|---|---:|")
    for row in rows:
        print(f"| {row['config']} | {'yes' if row['same_plan'] else 'NO'} | {row.get('max_abs_weight_difference', '–')} |")
    if not all(row["same_plan"] for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
