"""Sharded g/g² accumulators on the bundled model: 1 process against N gloo processes (CPU).

Each run prunes as configs/prune_smollm2.yaml does (HyWIA over ``--schemes``, heuristic fusion,
layers 4..27, 20% of the parameters, uniform allocation) from ``--windows`` windows of
builtin:python-docs/train × 128 tokens, each rank a fresh process with 1 thread (plain
``torch.distributed`` on gloo, no Trainer: hywia_lightning/distributed/local_ranks.py). Per rank it records
the bytes of ``g``/``g²`` held at the end of estimation (the tensors' numel × element size), the
peak resident memory of estimation + scoring (``hywia_lightning/memory_plan/resident_memory.py``), the wall
time and the plan; then whether every rank's plan is the 1-process plan. ``--device cuda``: rank r on
GPU r over NCCL, the peak being ``torch.cuda.max_memory_allocated`` (scripts/gpu_checks.sh, on 2 GPUs).
``--shard-weights``: the N ranks also shard the model's weights with FSDP2 (``fully_shard`` per decoder
layer, hywia_lightning/distributed/sharded_model.py) and slice it by gathering one layer at a time onto rank 0
(hywia_lightning/distributed/gathered_slicing.py); each rank records the weight bytes it holds, and rank 0's
sliced weights are compared with the 1-process ones (largest absolute difference).

    python scripts/benchmark_sharded_estimation.py --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--schemes", default="element1,element2,fluctuation",
                        help="HyWIA's schemes (element1 + element2: both g and g² are accumulated)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shard-weights", action="store_true", help="shard the weights too (FSDP2's fully_shard)")
    parser.add_argument("--model", default=None, help="a local Hugging Face folder (default: the bundled model)")
    parser.add_argument("--layers", default="4:-2", help="pruned layers START:END (END negative: from the end)")
    parser.add_argument("--out-dir", default="docs/performance")
    parser.add_argument("--name", default="sharded_estimation")
    return parser.parse_args()


def rank_run(out: Path, windows: int, schemes: list[str], device: str, args: argparse.Namespace) -> None:
    """One rank: load, calibrate, prune, slice; write what it measured."""
    import torch
    import torch.distributed as dist

    from hywia_lightning import BUNDLED_MODEL, CalibrationData, HyWIA, PruningScope, UniformAllocation, load_causal_lm
    from hywia_lightning.core.pipeline import prune
    from hywia_lightning.core.slicing import apply_plan
    from hywia_lightning.core.structures import target_layers
    from hywia_lightning.distributed.collective import process_group_collective
    from hywia_lightning.distributed.gathered_slicing import gathered_pruned
    from hywia_lightning.distributed.sharded_model import local_bytes, shard_model
    from hywia_lightning.memory_plan.resident_memory import current_rss, peak_rss, reset_peak

    world, rank = dist.get_world_size(), dist.get_rank()
    collective = process_group_collective() if world > 1 else None
    model, tokenizer = load_causal_lm(args.model or BUNDLED_MODEL)
    cuda = device == "cuda"
    model = model.to(f"cuda:{rank}" if cuda else "cpu")
    sharded = args.shard_weights and world > 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        shard_model(model, init_device_mesh(device, (world,)))
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
    start_layer, end_layer = (int(i) for i in args.layers.split(":"))
    weight_bytes = local_bytes(model.parameters())
    result = prune(model, calibration, HyWIA(schemes, "heuristic"), PruningScope(0.2), UniformAllocation(),
                   target_layers(model, start_layer, end_layer), collective=collective)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    if sharded:
        model = gathered_pruned(model, result.plan, receive=rank == 0)
    else:
        apply_plan(model, result.plan)
    if rank == 0:
        torch.save({name: t.cpu() for name, t in model.state_dict().items()}, out / "sliced.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "accumulator_bytes": result.accumulator_bytes,
        "weight_bytes": weight_bytes, "weights_sharded": sharded,
        "device": device, "start_rss_bytes": start_rss,
        "peak_rss_bytes": peak, "prune_seconds": seconds,
        "estimation_seconds": result.seconds["estimation"], "plan": result.plan.to_dict(),
    }))


def run(processes: int, windows: int, schemes: list[str], device: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    from hywia_lightning.distributed.local_ranks import run_ranks

    out = tmp / f"world{processes}"
    out.mkdir()
    start = time.perf_counter()
    run_ranks(rank_run, processes, out, windows, schemes, device, args, timeout=3600,
              backend="nccl" if device == "cuda" else "gloo")
    wall = time.perf_counter() - start
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    for r in ranks:
        r["wall_seconds"] = wall
    return ranks


def sliced_difference(tmp: Path, processes: int) -> float:
    """Largest absolute difference between the N-rank and the 1-process sliced weights (inf: other names or shapes)."""
    import torch

    one, many = (torch.load(tmp / f"world{n}" / "sliced.pt", weights_only=True) for n in (1, processes))
    if one.keys() != many.keys() or any(one[k].shape != many[k].shape for k in one):
        return float("inf")
    return max((float((one[k] - many[k]).abs().max()) for k in one if one[k].numel()), default=0.0)


def markdown(rows: list[dict], reference: dict) -> str:
    memory = "peak GPU memory allocated" if rows[0]["device"] == "cuda" else "peak RSS"
    lines = [f"| processes | rank | weights held (MiB) | g/g² held (MiB) | of 1 process | {memory}, estimation + scoring "
             "(GiB) | prune (s) | plan = 1 process's |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['rank']} | {r['weight_bytes'] / 2**20:.1f} | "
                     f"{r['accumulator_bytes'] / 2**20:.1f} | "
                     f"{r['accumulator_bytes'] / reference['accumulator_bytes']:.3f} | {r['peak_rss_bytes'] / 2**30:.3f} | "
                     f"{r['prune_seconds']:.0f} | {'yes' if r['plan'] == reference['plan'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      MALLOC_MMAP_THRESHOLD_=str(2**20))  # the ranks inherit it: freed tensors leave the process
    schemes = args.schemes.split(",")
    with tempfile.TemporaryDirectory(prefix="sharded-") as tmp:
        rows = [*run(1, args.windows, schemes, args.device, args, Path(tmp)),
                *run(args.processes, args.windows, schemes, args.device, args, Path(tmp))]
        difference = sliced_difference(Path(tmp), args.processes)
    reference = rows[0]
    for r in rows:
        r["same_plan"] = r["plan"] == reference["plan"]
        r["sliced_max_abs_difference"] = difference
        r["loadavg"] = os.getloadavg()
    out_dir = ROOT / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "plan"} for r in rows],
                                                         indent=1))
    table = markdown(rows, reference) + f"\n\nsliced weights, rank 0 against 1 process: largest |difference| {difference:.3g}"
    (out_dir / f"{args.name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
