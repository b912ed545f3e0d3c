"""How the pipeline's stages grow with model size and calibration windows, and what HyWIA costs
against single-granularity (LLM-Pruner-style Element¹) pruning run by the same code.

Every point is a real job (``main.py fit``'s CLI, the benchmark protocol's keys from
scripts/make_bench_configs.py, without perplexity and export) in a fresh process. Each stage's wall
seconds come from the run's report; each stage's peak resident memory is measured by resetting the
peak at the stage's start (``RunReport.stage`` is wrapped in the worker process only). Model sizes:
Llama configs of SmolLM2's family (30 layers, 3:1 grouped-query attention, its tokenizer) with
random weights, up to the bundled model itself; windows: the bundled model. One run per point, on
a shared machine: read the trends, not the third digit.

    python scripts/benchmark_scaling.py --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUNDLED = "bundled:SmolLM2-135M-Instruct"
# name -> LlamaConfig overrides of the bundled config (None: the bundled model itself)
SIZES = {
    "h192": {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 3, "num_key_value_heads": 1},
    "h384": {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2},
    "h576-l20": {"num_hidden_layers": 20},
    "bundled": None,
}
STAGES = ("estimation", "scoring", "pruning", "reconstruction")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--windows", default="8,16,32,64", help="calibration windows for the bundled model")
    parser.add_argument("--size-windows", type=int, default=32, help="calibration windows of the size sweep")
    parser.add_argument("--peers-target", type=float, default=0.2, help="target_ratio of the peers comparison")
    parser.add_argument("--target", type=float, default=0.2, help="target_ratio of the sweeps (50%% is out of reach of the small models, whose embeddings are a large share)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: sizes, windows, peers")
    parser.add_argument("--out-dir", default="docs/performance")
    parser.add_argument("--name", default="scaling")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


# -- worker: one job, stage peaks measured ------------------------------------------------------------
def worker(config_path: str, result_path: str) -> None:
    import torch

    from callbacks import STAGES as PIPELINE_STAGES
    from hywia_lightning.cli import HywiaCLI
    from hywia_lightning.memory_plan.resident_memory import current_rss, peak_rss, reset_peak
    from hywia_lightning.report import run_report as report_module

    torch.set_num_threads(1)
    stages: dict[str, dict] = {}
    original = report_module.RunReport.stage

    @contextmanager
    def measured_stage(self, name: str):
        before, cpu = current_rss(), time.process_time()
        reset_peak()
        with original(self, name):
            yield
        seen = stages.setdefault(name, {"peak_bytes": 0, "growth_bytes": 0, "cpu_seconds": 0.0})
        seen["peak_bytes"] = max(seen["peak_bytes"], peak_rss())
        seen["growth_bytes"] = max(seen["growth_bytes"], peak_rss() - before)
        seen["cpu_seconds"] += time.process_time() - cpu  # 1 thread: the work, whatever the load

    report_module.RunReport.stage = measured_stage
    cli = HywiaCLI(args=["fit", "--config", config_path], stages=PIPELINE_STAGES)
    sections = cli.model.report.sections
    from hywia_lightning.core.plan import count_parameters

    Path(result_path).write_text(json.dumps({
        "seconds": sections["seconds"], "fusion": {k: v for k, v in sections.get("fusion", {}).items() if k != "weights"},
        "stages": stages, "params_after": count_parameters(cli.model.model),
        "params_before": sections.get("pruning", {}).get("params_before"),
    }))


# -- driver ---------------------------------------------------------------------------------------------
def random_model(name: str, overrides: dict, folder: Path) -> str:
    """A random-weight model of the bundled family with ``overrides``, saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from hywia_lightning.models.loading import resolve_model_path

    bundled = resolve_model_path(BUNDLED)
    config = AutoConfig.from_pretrained(bundled)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    path = folder / name
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled).save_pretrained(path)
    return str(path)


def job(row: str, model: str, windows: int, target: float, root: Path) -> dict:
    import make_bench_configs as bench

    callback, args = bench.ROWS[row.replace("_recon", "")]
    config = bench.job(row, (callback, {"target_ratio": target, **args}),
                       bench.RECONSTRUCTION if row.endswith("_recon") else None)
    config = copy.deepcopy(config)
    config["model"]["init_args"]["model_name_or_path"] = model
    config["data"]["init_args"]["num_windows"] = windows
    config["data"]["init_args"]["source"] = str(ROOT / bench.CALIBRATION)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(root / row)
    trainer["enable_progress_bar"] = False
    config.pop("perplexity"), config.pop("export")
    pruning = config["pruning"]["init_args"]
    pruning["layer_end"] = -2  # the protocol's 4..27 of 30 layers, for any depth
    mode = (pruning.get("fusion") or {}).get("mode")
    training = mode.get("init_args", {}) if isinstance(mode, dict) else {}  # the Learned mode's keys
    if "holdout" in training:
        training["holdout"] = min(training["holdout"], windows // 4)  # the protocol's 8 of 32
    return config


def run_job(config: dict, tmp: Path, label: str) -> dict:
    import yaml

    path, result = tmp / f"{label}.yaml", tmp / f"{label}.json"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", str(path), "--result", str(result)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{done.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["wall_seconds"] = time.perf_counter() - start
    out["loadavg"] = os.getloadavg()
    print(f"{label}: {out['seconds']} ({out['wall_seconds']:.0f}s wall)", flush=True)
    return out


SERIES = (("estimation", "estimation"), ("scoring + fusion training", "scoring"), ("reconstruction", "reconstruction"))


def cpu(point: dict, stage: str) -> float:
    return point["stages"].get(stage, {}).get("cpu_seconds", 0.0)


def peak_gib(point: dict, stage: str) -> float:
    return point["stages"].get(stage, {}).get("peak_bytes", 0) / 2**30


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), dpi=72)
    for column, (key, xlabel, xs) in enumerate((
        ("sizes", "parameters (millions)", lambda p: p["params_before"] / 1e6),
        ("windows", "calibration windows (bundled model)", lambda p: p["windows"]),
    )):
        points = result.get(key, [])
        if not points:
            continue
        x = [xs(p) for p in points]
        for label, stage in SERIES:
            axes[0][column].plot(x, [cpu(p, stage) for p in points], "o-", label=label)
            axes[1][column].plot(x, [peak_gib(p, stage) for p in points], "o-", label=label)
        axes[0][column].set_ylabel("CPU seconds (1 thread)")
        axes[1][column].set_ylabel("peak resident GiB in the stage")
        axes[1][column].set_xlabel(xlabel)
        for row in axes:
            row[column].grid(alpha=0.3)
            row[column].set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"HyWIA learned + reconstruction, {result['target']:.0%} removed, layers 4..L-3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary_rows(result: dict) -> list[str]:
    def row(label, p):
        training = p["fusion"].get("training") or {}
        return (f"| {label} | {p['params_before'] / 1e6:.1f}M | {p['windows']} | {cpu(p, 'estimation'):.1f} | "
                f"{cpu(p, 'scoring'):.1f} ({training.get('epochs_run', '–')}) | {cpu(p, 'reconstruction'):.1f} | "
                f"{sum(cpu(p, k) for k in STAGES):.1f} | {sum(p['seconds'].get(k, 0) for k in STAGES):.1f} | "
                f"{peak_gib(p, 'estimation'):.2f} | {peak_gib(p, 'scoring'):.2f} | {peak_gib(p, 'reconstruction'):.2f} |")

    header = ["| point | params | windows | estimation CPU s | scoring + fusion training CPU s (epochs) | "
              "reconstruction CPU s | all stages CPU s | all stages wall s | estimation peak GiB | "
              "scoring + fusion peak GiB | reconstruction peak GiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines = [f"1 torch thread; load average {result['loadavg_before'][0]:.2f} → {result.get('loadavg_after', [0])[0]:.2f}; "
             "one run per point."]
    for key in ("sizes", "windows"):
        if result.get(key):
            lines += ["", f"{key} ({result['target']:.0%} removed):", ""] + header + [row(p["label"], p) for p in result[key]]
    if result.get("peers"):
        lines += ["", f"peers ({result['peers_target']:.0%} removed, bundled model, 32 windows):", ""] + header
        lines += [row(p["label"], p) for p in result["peers"]]
    return lines


def save(result: dict, args) -> None:
    """Write what is measured so far (a long run that fails keeps its finished points)."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return
    skip = set(filter(None, args.skip.split(",")))
    result = {"command": " ".join(["python", *sys.argv]), "cpu_count": os.cpu_count(), "torch_threads": 1,
              "loadavg_before": os.getloadavg(), "target": args.target, "peers_target": args.peers_target}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        cache = {}
        if "sizes" not in skip:
            result["sizes"] = []
            for name in filter(None, args.sizes.split(",")):
                model = BUNDLED if SIZES[name] is None else random_model(name, SIZES[name], tmp)
                point = run_job(job("hywia_learned_recon", model, args.size_windows, args.target, tmp), tmp, f"size-{name}")
                point.update(label=name, windows=args.size_windows)
                result["sizes"].append(point)
                save(result, args)
                if SIZES[name] is None:
                    cache[args.size_windows] = point
        if "windows" not in skip:
            result["windows"] = []
            for n in (int(v) for v in args.windows.split(",")):
                point = cache.get(n) or run_job(job("hywia_learned_recon", BUNDLED, n, args.target, tmp), tmp, f"windows-{n}")
                point = dict(point, label=f"bundled, {n} windows", windows=n)
                result["windows"].append(point)
                save(result, args)
        if "peers" not in skip:
            result["peers"] = []
            for row in ("element1", "element1_recon", "hywia_learned", "hywia_learned_recon"):
                same = row == "hywia_learned_recon" and args.peers_target == args.target and 32 in cache
                point = dict(cache[32]) if same else run_job(job(row, BUNDLED, 32, args.peers_target, tmp), tmp, f"peers-{row}")
                point.update(label=row, windows=32)
                result["peers"].append(point)
                save(result, args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["loadavg_after"] = os.getloadavg()
    save(result, args)
    out = Path(args.out_dir)
    if result.get("sizes") or result.get("windows"):
        plot(result, out / f"{args.name}.png")
    text = "\n".join(summary_rows(result)) + f"\n\n`{result['command']}`\n"
    (out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
