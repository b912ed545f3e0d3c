"""Sharded g/g² accumulators on the bundled model: 1 process against N gloo processes (CPU).

Each run prunes as configs/prune_smollm2.yaml does (HyWIA over ``--schemes``, heuristic fusion,
layers 4..27, 20% of the parameters, uniform allocation) from ``--windows`` windows of
builtin:python-docs/train × 128 tokens, each rank a fresh process with 1 thread (plain
``torch.distributed`` on gloo, no Trainer: hywia_lightning/local_ranks.py). Per rank it records
the bytes of ``g``/``g²`` held at the end of estimation (the tensors' numel × element size), the
peak resident memory of estimation + scoring (``hywia_lightning/resident_memory.py``), the wall
time and the plan; then whether every rank's plan is the 1-process plan. ``--device cuda``: rank r on
GPU r over NCCL, the peak being ``torch.cuda.max_memory_allocated`` (scripts/gpu_checks.sh, on 2 GPUs).

    python scripts/benchmark_sharded_estimation.py --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--schemes", default="element1,element2,fluctuation",
                        help="HyWIA's schemes (element1 + element2: both g and g² are accumulated)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out-dir", default="docs/performance")
    parser.add_argument("--name", default="sharded_estimation")
    return parser.parse_args()


def rank_run(out: Path, windows: int, schemes: list[str], device: str) -> None:
    """One rank: load, calibrate, prune; write what it measured."""
    import torch
    import torch.distributed as dist

    from hywia_lightning import BUNDLED_MODEL, CalibrationData, HyWIA, PruningScope, UniformAllocation, load_causal_lm
    from hywia_lightning.collective import process_group_collective
    from hywia_lightning.pipeline import prune, target_layers
    from hywia_lightning.resident_memory import current_rss, peak_rss, reset_peak

    collective = process_group_collective() if dist.get_world_size() > 1 else None
    model, tokenizer = load_causal_lm(BUNDLED_MODEL)
    cuda = device == "cuda"
    model = model.to(f"cuda:{dist.get_rank()}" if cuda else "cpu")
    data = CalibrationData("builtin:python-docs/train", windows, 128, seed=0)
    data.attach(tokenizer, model)
    calibration = data.windows()
    with torch.no_grad():  # page the memory-mapped weights in before measuring
        model(input_ids=calibration[:1].to(model.device))
    start_rss = torch.cuda.memory_allocated() if cuda else current_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
    start = time.perf_counter()
    result = prune(model, calibration, HyWIA(schemes, "heuristic"), PruningScope(0.2), UniformAllocation(),
                   target_layers(model, 4, -2), collective=collective)
    seconds = time.perf_counter() - start
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": dist.get_world_size(), "accumulator_bytes": result.accumulator_bytes,
        "device": device, "start_rss_bytes": start_rss,
        "peak_rss_bytes": torch.cuda.max_memory_allocated() if cuda else peak_rss(), "prune_seconds": seconds,
        "estimation_seconds": result.seconds["estimation"], "plan": result.plan.to_dict(),
    }))


def run(processes: int, windows: int, schemes: list[str], device: str, tmp: Path) -> list[dict]:
    from hywia_lightning.local_ranks import run_ranks

    out = tmp / f"world{processes}"
    out.mkdir()
    start = time.perf_counter()
    run_ranks(rank_run, processes, out, windows, schemes, device, timeout=3600,
              backend="nccl" if device == "cuda" else "gloo")
    wall = time.perf_counter() - start
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    for r in ranks:
        r["wall_seconds"] = wall
    return ranks


def markdown(rows: list[dict], reference: dict) -> str:
    memory = "peak GPU memory allocated" if rows[0]["device"] == "cuda" else "peak RSS"
    lines = [f"| processes | rank | g/g² held (MiB) | of 1 process | {memory}, estimation + scoring (GiB) | prune (s) | "
             "plan = 1 process's |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['rank']} | {r['accumulator_bytes'] / 2**20:.1f} | "
                     f"{r['accumulator_bytes'] / reference['accumulator_bytes']:.3f} | {r['peak_rss_bytes'] / 2**30:.3f} | "
                     f"{r['prune_seconds']:.0f} | {'yes' if r['plan'] == reference['plan'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      MALLOC_MMAP_THRESHOLD_=str(2**20))  # the ranks inherit it: freed tensors leave the process
    schemes = args.schemes.split(",")
    with tempfile.TemporaryDirectory(prefix="sharded-") as tmp:
        rows = [*run(1, args.windows, schemes, args.device, Path(tmp)),
                *run(args.processes, args.windows, schemes, args.device, Path(tmp))]
    reference = rows[0]
    for r in rows:
        r["same_plan"] = r["plan"] == reference["plan"]
        r["loadavg"] = os.getloadavg()
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "plan"} for r in rows],
                                                         indent=1))
    table = markdown(rows, reference)
    (out_dir / f"{args.name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
