"""The memory plan's predictions against measured peaks: real jobs, each stage's peak resident memory.

Each row is a real job (``main.py fit``'s CLI on ``configs/prune_smollm2.yaml`` with overrides) in a
fresh process with 1 thread. Before it runs, the worker computes the job's plan
(``scripts/memory_plan.py``'s numbers); while it runs, the peak resident memory is reset at each
stage boundary (estimation, scoring, fusion training, reconstruction, perplexity: the library calls
are wrapped in the worker process only, ``hywia_lightning/memory_plan/resident_memory.py``) and each stage's
absolute peak is recorded. The plan includes the process's runtime, so the two are compared as
they are. A stage's measured peak includes what the C allocator keeps from earlier stages.

    python scripts/benchmark_memory_plan.py --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = "configs/prune_smollm2.yaml"
TINY = {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 3, "num_key_value_heads": 1}
# row -> (overrides of CONFIG, model: None = the bundled one, "tiny" = a random model of TINY's shape)
ROWS = {
    "bundled": ([], None),
    "bundled_bf16": (["--pruning.init_args.accumulate_dtype", "bfloat16", "--model.init_args.dtype", "bfloat16"], None),
    "bundled_learned": (["--pruning.init_args.fusion.schemes", "[element1, element2, vector]",
                         "--pruning.init_args.fusion.mode", "hywia_lightning.Learned",
                         "--pruning.init_args.fusion.mode.init_args.epochs", "2"], None),
    "tiny": ([], "tiny"),
    # prune by 50%, then 4 steps of LoRA distilled from the teacher (configs/recover_smollm2.yaml), on text
    # sources (its generated ones would spend minutes sampling; the memory is the same)
    "bundled_distill_recovery": (["--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                                  "--data.init_args.source", "builtin:python-docs/train",
                                  "--pruning.init_args.calibration.init_args.source", "builtin:python-docs/train",
                                  "--reconstruction.calibration.init_args.source", "builtin:python-docs/train"], None),
}
CONFIGS = {"bundled_distill_recovery": "configs/recover_smollm2.yaml"}  # rows of another config than CONFIG
STAGES = ("estimation", "scoring", "fusion training", "reconstruction", "recovery", "perplexity")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out-dir", default="docs/performance")
    parser.add_argument("--name", default="memory_plan")
    parser.add_argument("--allocator", default="mmap", choices=["mmap", "default"],
                        help="mmap: MALLOC_MMAP_THRESHOLD_=1048576 (freed tensors leave the process); default: glibc's")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args()


# -- worker: one job ------------------------------------------------------------------------------------
class Phases:
    """The peak resident memory of each phase: the peak is reset whenever a phase starts."""

    def __init__(self) -> None:
        from hywia_lightning.memory_plan.resident_memory import current_rss, peak_rss, reset_peak

        self.peak_rss, self.reset_peak, self.current_rss = peak_rss, reset_peak, current_rss
        self.current, self.peaks, self.entered = "loading", {}, {}

    def enter(self, name: str) -> str:
        previous = self.current
        self.peaks[previous] = max(self.peaks.get(previous, 0), self.peak_rss())
        self.reset_peak()
        self.current = name
        self.entered.setdefault(name, self.current_rss())  # resident size when the phase first starts
        return previous

    def wrap(self, owner, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)
        phases = self

        def wrapped(*args, **kwargs):
            previous = phases.enter(phase)
            try:
                return original(*args, **kwargs)
            finally:
                phases.enter(previous)

        setattr(owner, attribute, wrapped)


def worker(result_path: str, job_args: list[str]) -> None:
    import torch
    from lightning.pytorch.loops.fit_loop import _FitLoop

    import callbacks.perplexity as perplexity_callback
    from callbacks import STAGES as PIPELINE_STAGES
    from callbacks import StructuredPruning
    from hywia_lightning.cli import HywiaCLI, parse_job
    from hywia_lightning.core import pipeline
    from hywia_lightning.fusion import training as fusion_training
    from hywia_lightning.memory_plan.job import job_plan
    from hywia_lightning.reconstruction import modes as reconstruction_modes

    torch.set_num_threads(1)
    planned = job_plan(parse_job(job_args, PIPELINE_STAGES))
    phases = Phases()
    phases.wrap(pipeline, "estimate", "estimation")
    phases.wrap(StructuredPruning, "score", "scoring")
    phases.wrap(pipeline, "unit_groups", "scoring")
    phases.wrap(fusion_training.FusionTraining, "fit", "fusion training")
    phases.wrap(reconstruction_modes.Independent, "before_slicing", "reconstruction")
    phases.wrap(reconstruction_modes.Sequential, "after_slicing", "reconstruction")
    phases.wrap(perplexity_callback, "perplexity", "perplexity")
    phases.wrap(_FitLoop, "run", "recovery")  # the training steps (and their validations) of a recovery job
    cli = HywiaCLI(args=["fit", *job_args], stages=PIPELINE_STAGES)
    phases.enter("end")
    export = Path(cli.trainer.default_root_dir) / "export"
    report = json.loads((export / "report.json").read_text()) if (export / "report.json").is_file() else {}
    Path(result_path).write_text(json.dumps({
        "measured_gib": {k: v / 2**30 for k, v in phases.peaks.items()},
        "entered_gib": {k: v / 2**30 for k, v in phases.entered.items()},
        "planned": planned.plan.to_dict(),
        "perplexity": report.get("perplexity"),
        "plan_file": str(export / "pruning_plan.json"),
    }))


# -- driver -------------------------------------------------------------------------------------------
def tiny_model(folder: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from hywia_lightning.models.loading import resolve_model_path

    bundled = resolve_model_path("bundled:SmolLM2-135M-Instruct")
    config = AutoConfig.from_pretrained(bundled)
    for key, value in TINY.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    path = folder / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled).save_pretrained(path)
    return str(path)


def run_row(name: str, tmp: Path, allocator: str) -> dict:
    overrides, model = ROWS[name]
    args = ["--config", str(ROOT / CONFIGS.get(name, CONFIG)), *overrides, "--trainer.default_root_dir", str(tmp / name),
            "--trainer.enable_progress_bar", "false"]
    if model == "tiny":
        args += ["--model.init_args.model_name_or_path", tiny_model(tmp), "--perplexity.init_args.baseline", "false"]
    result = tmp / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if allocator == "mmap":  # glibc: every block above 1 MiB its own mapping, returned when freed (docs/performance.md §1)
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", str(result), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out.update(row=name, allocator=allocator, overrides=overrides, wall_seconds=time.perf_counter() - start, loadavg=os.getloadavg())
    plan_file = Path(out.pop("plan_file"))
    out["pruning_plan"] = plan_summary(json.loads(plan_file.read_text())) if plan_file.is_file() else None
    print(f"{name}: {out['wall_seconds']:.0f}s wall, measured {out['measured_gib']}", flush=True)
    return out


def plan_summary(plan: dict) -> dict:
    """A pruning plan's digest and its kept units per layer (to compare rows without storing every index)."""
    import hashlib

    return {"sha256": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(),
            "kept": {layer: {kind: units for kind, units in widths.items() if kind in ("heads", "channels") and units}
                     for layer, widths in plan["layers"].items()}}


def units_differing(a: dict, b: dict) -> dict[str, int]:
    """Kept units of plan ``a`` that plan ``b`` does not keep, per kind."""
    counts = {"heads": 0, "channels": 0, "kept_heads": 0, "kept_channels": 0}
    for layer, widths in a["kept"].items():
        for kind, units in widths.items():
            counts[kind] += len(set(units) - set(b["kept"].get(layer, {}).get(kind, [])))
            counts[f"kept_{kind}"] += len(units)
    return counts


def markdown(rows: list[dict]) -> str:
    lines = ["| job | allocator | stage | planned GiB | measured GiB | planned / measured |", "|---|---|---|---:|---:|---:|"]
    for row in rows:
        for stage in STAGES:
            planned = row["planned"]["stages"].get(stage, {}).get("gib")
            measured = row["measured_gib"].get(stage)
            if planned is None or measured is None:
                continue
            lines.append(f"| {row['row']} | {row['allocator']} | {stage} | {planned:.3f} | {measured:.3f} | {planned / measured:.2f} |")
        planned, measured = row["planned"]["peak_gib"], max(row["measured_gib"].values())
        lines.append(f"| {row['row']} | {row['allocator']} | **the job's peak** | {planned:.3f} | {measured:.3f} | "
                     f"{planned / measured:.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1:])
        return
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memory-plan-") as tmp:
        rows = [run_row(name, Path(tmp), args.allocator) for name in args.rows.split(",")]
    reference = rows[0]
    for row in rows:  # the same model's plans against the first row's (bfloat16 against float32)
        if row is not reference and row["pruning_plan"] and reference["pruning_plan"] and ROWS[row["row"]][1] == ROWS[reference["row"]][1]:
            row[f"units_not_kept_by_{reference['row']}"] = units_differing(row["pruning_plan"], reference["pruning_plan"])
    for row in rows:
        if row["pruning_plan"]:
            row["pruning_plan"].pop("kept")
    (out_dir / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (out_dir / f"{args.name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
