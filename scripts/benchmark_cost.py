"""Cost of importance estimation against its floor, and distributed estimation, on the bundled model.

Ratios measured (docs/performance.md explains them):

- time: estimation (hooks, per-window gradients, accumulators) / the same forward + backward passes
  alone (``loss.backward()`` with the prunable weights trainable, everything else frozen, no hooks,
  gradients dropped after each pass); target <= 1.2;
- memory: peak of estimation / (weights + accumulators + activations); target <= 1.1, where
  weights = resident growth of loading the model, accumulators = bytes of the ``g``/``g²``
  tensors, activations = peak growth of one forward + backward of the same batch whose weight
  gradients are freed as soon as autograd produces them (all measured in the same process kind);
- distributed: wall seconds per window of 2 processes (DDP-style: windows sharded, statistics
  all-reduced over gloo) against 1 process with 1 thread and 1 process with 2 threads.

Every measurement runs in a fresh subprocess (clean peak resident memory), with
``torch.set_num_threads(--threads)``; the kinds alternate within each round and the median over
rounds is reported, so load from other processes affects all of them alike.

    python scripts/benchmark_cost.py --windows 32 --rounds 3 --out-dir docs/performance
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CALIBRATION = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
# kind -> worker arguments; the default set of a run
KINDS = {
    "plain_b1": {"worker": "plain", "batch_size": 1},
    "estimation_b1": {"worker": "estimation", "batch_size": 1},
    "activations_b1": {"worker": "activations", "batch_size": 1},
    "plain_b8": {"worker": "plain", "batch_size": 8},
    "estimation_b8": {"worker": "estimation", "batch_size": 8},
    "activations_b8": {"worker": "activations", "batch_size": 8},
    "estimation_b1_bfloat16": {"worker": "estimation", "batch_size": 1, "dtype": "bfloat16"},
    "estimation_b1_2threads": {"worker": "estimation", "batch_size": 1, "threads": 2},
    "ddp_2processes": {"worker": "ddp", "batch_size": 1},
}
# glibc keeps freed blocks of big tensors for reuse and fragments them over passes; a fixed mmap
# threshold gives every tensor above 1 MiB its own mapping, returned to the system when freed
MMAP = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
for _name in ("plain_b1", "estimation_b1", "activations_b1", "plain_b8", "estimation_b8", "activations_b8"):
    KINDS[f"{_name}_mmap"] = {**KINDS[_name], "env": MMAP}
DEFAULT_KINDS = [k for k in KINDS if not k.endswith("_mmap")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--source", default=str(CALIBRATION), help="calibration text")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    parser.add_argument("--out-dir", default="docs/performance")
    parser.add_argument("--name", default="cost")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


# -- workers (one per subprocess) ------------------------------------------------------------------
def setup(args, rank: int = 0, world_size: int = 1) -> dict:
    """Load the model and this rank's windows; resident sizes before and after the weights."""
    import torch

    from hywia_lightning.core.structures import target_layers
    from hywia_lightning.core.unit_groups import prunable_linears
    from hywia_lightning.data.calibration import CalibrationData
    from hywia_lightning.memory_plan.resident_memory import current_rss
    from hywia_lightning.models.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    rss_start = current_rss()
    model, tokenizer = load_causal_lm("bundled:SmolLM2-135M-Instruct", None, "float32")
    with torch.no_grad():  # the checkpoint is memory-mapped: make every weight resident before measuring
        for p in model.parameters():
            p.sum()
    rss_weights = current_rss()
    data = CalibrationData(args.source, args.windows, args.seq_len, seed=0)
    data.attach(tokenizer, model)
    windows = data.windows()[rank::world_size]
    layers = target_layers(model, 4, -2)  # the protocol's layers 4..27
    return {
        "model": model, "windows": windows, "linears": prunable_linears(layers, "query_heads"),
        "weights_rss": rss_weights - rss_start,
        "weights_bytes": sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()),
    }


def run_plain(args, s: dict) -> dict:
    """The floor's time: the same passes with the prunable weights trainable and no hooks."""
    from hywia_lightning.core.lm_loss import language_model_loss

    model, windows = s["model"], s["windows"]
    tracked = {id(m.weight) for m in s["linears"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)
    start = time.perf_counter()
    for i in range(0, len(windows), args.batch_size):
        language_model_loss(model, windows[i : i + args.batch_size]).backward()
        for m in s["linears"]:
            m.weight.grad = None
    return {"seconds": time.perf_counter() - start}


def run_activations(args, s: dict) -> dict:
    """One forward + backward of one batch whose weight gradients are freed on arrival."""
    from hywia_lightning.core.lm_loss import language_model_loss

    model = s["model"]
    tracked = [m.weight for m in s["linears"]]
    ids = {id(p) for p in tracked}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in tracked]
    for _ in range(2):  # the second pass sees the allocator in its steady state
        language_model_loss(model, s["windows"][: args.batch_size]).backward()
    for h in handles:
        h.remove()
    return {}


def run_estimation(args, s: dict, all_reduce=None) -> dict:
    import torch

    from hywia_lightning.core.estimation import Estimator, accumulate_dtype_named

    # the statistics Element¹ and Element² read (what the cost table's rows estimate)
    estimator = Estimator(s["model"], s["linears"], {"gradients", "squared_gradients", "input_moments"},
                          len(s["windows"]), accumulate_dtype_named(args.dtype), args.batch_size)
    start, cpu_start = time.perf_counter(), time.process_time()
    estimator.accumulate(s["windows"])
    accumulated = time.perf_counter() - start
    accumulator_bytes = sum(t.numel() * t.element_size() for d in (estimator.grad_sum, estimator.sq_grad_sum,
                                                                   estimator.input_sum, estimator.input_sq_sum)
                            for t in d.values())
    stats = estimator.statistics(all_reduce)
    seconds = time.perf_counter() - start
    weights = [m.weight for m in s["linears"]]
    return {
        "seconds": seconds, "cpu_seconds": time.process_time() - cpu_start, "accumulate_seconds": accumulated,
        "accumulator_bytes": accumulator_bytes,
        # checksums: equal statistics for every batch size (exact per-window gradients)
        "checksum_g": sum(float(stats.parameters[w].grad.double().abs().sum()) for w in weights),
        "checksum_g2": sum(float(stats.parameters[w].sq_grad.double().sum()) for w in weights),
        "windows_seen": estimator.windows_seen, "dtype": str(estimator.accumulate_dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }


def measured(fn, args, s: dict, **kwargs) -> dict:
    from hywia_lightning.memory_plan.resident_memory import current_rss, peak_rss, reset_peak

    rss_ready = current_rss()
    reset_peak()
    result = fn(args, s, **kwargs)
    result.update(weights_rss=s["weights_rss"], weights_bytes=s["weights_bytes"], peak_growth=peak_rss() - rss_ready,
                  windows=len(s["windows"]), batch_size=args.batch_size)
    return result


def ddp_rank(rank: int, args, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    s = setup(args, rank, 2)
    dist.barrier()
    start = time.perf_counter()

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    result = measured(run_estimation, args, s, all_reduce=all_reduce)
    dist.barrier()
    result["wall_seconds"] = time.perf_counter() - start
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": gathered, "seconds": result["wall_seconds"],
                                         "windows": args.windows, "torch_threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def worker(args) -> dict:
    if args.worker == "ddp":
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(ddp_rank, args=(args, port, args.result), nprocs=2)
        return json.loads(Path(args.result).read_text())
    s = setup(args)
    fn = {"plain": run_plain, "activations": run_activations, "estimation": run_estimation}[args.worker]
    return measured(fn, args, s)


# -- driver ------------------------------------------------------------------------------------------
def run_kind(args, name: str, tmp: Path) -> dict:
    spec = KINDS[name]
    result = tmp / f"{name}.json"
    command = [sys.executable, __file__, "--worker", spec["worker"], "--batch-size", str(spec["batch_size"]),
               "--dtype", spec.get("dtype", "float32"), "--threads", str(spec.get("threads", 1)),
               "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--source", args.source,
               "--result", str(result)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), MKL_NUM_THREADS=str(spec.get("threads", 1)),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **spec.get("env", {}))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def summarize(runs: dict[str, list[dict]]) -> dict:
    med = lambda name, key: statistics.median(r[key] for r in runs[name])
    out = {}
    for b in ("b1", "b8", "b1_mmap", "b8_mmap"):
        if {f"plain_{b}", f"estimation_{b}", f"activations_{b}"} <= runs.keys():
            weights = med(f"estimation_{b}", "weights_rss")
            accumulators = med(f"estimation_{b}", "accumulator_bytes")
            activations = med(f"activations_{b}", "peak_growth")
            peak = weights + med(f"estimation_{b}", "peak_growth")
            floor = weights + accumulators + activations
            out[b] = {
                "time_ratio": med(f"estimation_{b}", "seconds") / med(f"plain_{b}", "seconds"),
                "time_ratios_per_round": [e["seconds"] / p["seconds"] for e, p in zip(runs[f"estimation_{b}"], runs[f"plain_{b}"])],
                "estimation_seconds_per_window": med(f"estimation_{b}", "seconds") / med(f"estimation_{b}", "windows"),
                "plain_seconds_per_window": med(f"plain_{b}", "seconds") / med(f"plain_{b}", "windows"),
                "memory_ratio": peak / floor,
                "peak_gib": peak / 2**30, "floor_gib": floor / 2**30, "weights_gib": weights / 2**30,
                "weights_exact_gib": med(f"estimation_{b}", "weights_bytes") / 2**30,
                "accumulators_gib": accumulators / 2**30, "activations_gib": activations / 2**30,
                "plain_peak_gib": (weights + med(f"plain_{b}", "peak_growth")) / 2**30,
            }
    if {"estimation_b1", "estimation_b8"} <= runs.keys():
        one, eight = runs["estimation_b1"][0], runs["estimation_b8"][0]
        out["batched_vs_per_window_relative_difference"] = {
            key: abs(eight[key] - one[key]) / abs(one[key]) for key in ("checksum_g", "checksum_g2")}
    if "estimation_b1_bfloat16" in runs:
        out["bfloat16_accumulators"] = {
            "accumulators_gib": med("estimation_b1_bfloat16", "accumulator_bytes") / 2**30,
            "peak_gib": (med("estimation_b1_bfloat16", "weights_rss") + med("estimation_b1_bfloat16", "peak_growth")) / 2**30,
            "seconds_per_window": med("estimation_b1_bfloat16", "seconds") / med("estimation_b1_bfloat16", "windows"),
        }
        if "estimation_b1" in runs:
            one, bf = runs["estimation_b1"][0], runs["estimation_b1_bfloat16"][0]
            out["bfloat16_accumulators"]["relative_difference"] = {
                key: abs(bf[key] - one[key]) / abs(one[key]) for key in ("checksum_g", "checksum_g2")}
    if {"estimation_b1", "ddp_2processes"} <= runs.keys():
        single = med("estimation_b1", "seconds") / args_windows(runs, "estimation_b1")
        ddp = statistics.median(r["seconds"] for r in runs["ddp_2processes"]) / runs["ddp_2processes"][0]["windows"]
        out["distributed"] = {
            "seconds_per_window_1process_1thread": single,
            "seconds_per_window_2processes_1thread_each": ddp,
            "speedup_2processes_vs_1process_1thread": single / ddp,
            # CPU seconds: what the wall time would be with a free core per process (this machine's cores are shared)
            "cpu_seconds_per_window_1process": med("estimation_b1", "cpu_seconds") / args_windows(runs, "estimation_b1"),
            "busiest_rank_cpu_seconds_per_window_2processes": statistics.median(
                max(rank["cpu_seconds"] for rank in r["ranks"]) / r["windows"] for r in runs["ddp_2processes"]),
            "peak_gib_per_process": statistics.median(
                (rank["weights_rss"] + rank["peak_growth"]) / 2**30 for r in runs["ddp_2processes"] for rank in r["ranks"]),
        }
        if "estimation_b1_2threads" in runs:
            two = med("estimation_b1_2threads", "seconds") / args_windows(runs, "estimation_b1_2threads")
            out["distributed"]["seconds_per_window_1process_2threads"] = two
            out["distributed"]["speedup_2processes_vs_1process_2threads"] = two / ddp
    return out


def args_windows(runs: dict, name: str) -> int:
    return runs[name][0]["windows"]


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"Bundled SmolLM2-135M, {result['windows']} windows × {result['seq_len']} tokens, layers 4..27 prunable, "
             f"{result['cpu_count']} CPU cores, 1 torch thread per process unless stated; median of {result['rounds']} "
             f"interleaved rounds; load average {result['loadavg_before'][0]:.2f} → {result['loadavg_after'][0]:.2f}."]
    batches = [b for b in ("b1", "b8", "b1_mmap", "b8_mmap") if b in s]
    if batches:
        lines += ["", "| batch | estimation s/window | plain fwd+bwd s/window | time ratio | peak GiB | "
                      "floor GiB (weights + accumulators + activations) | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for b in batches:
        if b in s:
            r = s[b]
            label = b[1:].replace("_mmap", ", MALLOC_MMAP_THRESHOLD_=1048576")
            lines.append(f"| {label} | {r['estimation_seconds_per_window']:.3f} | {r['plain_seconds_per_window']:.3f} | "
                         f"{r['time_ratio']:.3f} | {r['peak_gib']:.3f} | {r['floor_gib']:.3f} ({r['weights_gib']:.3f} + "
                         f"{r['accumulators_gib']:.3f} + {r['activations_gib']:.3f}) | {r['memory_ratio']:.3f} |")
    if "distributed" in s:
        d = s["distributed"]
        lines += ["", "| estimation | s/window | speedup of 2 processes |", "|---|---:|---:|",
                  f"| 1 process, 1 thread | {d['seconds_per_window_1process_1thread']:.3f} | "
                  f"{d['speedup_2processes_vs_1process_1thread']:.2f}x |"]
        if "seconds_per_window_1process_2threads" in d:
            lines.append(f"| 1 process, 2 threads | {d['seconds_per_window_1process_2threads']:.3f} | "
                         f"{d['speedup_2processes_vs_1process_2threads']:.2f}x |")
        lines.append(f"| 2 processes (gloo), 1 thread each | {d['seconds_per_window_2processes_1thread_each']:.3f} | – |")
        if "cpu_seconds_per_window_1process" in d:
            lines += ["", f"CPU seconds per window (the wall time with a free core per process): 1 process "
                          f"{d['cpu_seconds_per_window_1process']:.3f}, 2 processes (busiest rank) "
                          f"{d['busiest_rank_cpu_seconds_per_window_2processes']:.3f}, i.e. "
                          f"{d['cpu_seconds_per_window_1process'] / d['busiest_rank_cpu_seconds_per_window_2processes']:.2f}x; "
                          f"peak {d['peak_gib_per_process']:.2f} GiB per process."]
    if "bfloat16_accumulators" in s:
        b = s["bfloat16_accumulators"]
        lines += ["", f"bfloat16 accumulators: {b['accumulators_gib']:.3f} GiB, peak {b['peak_gib']:.3f} GiB, "
                      f"{b['seconds_per_window']:.3f} s/window" + (
                          f"; relative difference of Σ|g| and Σg² to float32: {b['relative_difference']['checksum_g']:.1e}, "
                          f"{b['relative_difference']['checksum_g2']:.1e}" if "relative_difference" in b else "")]
    if "batched_vs_per_window_relative_difference" in s:
        d = s["batched_vs_per_window_relative_difference"]
        lines.append(f"Batch 8 vs batch 1 statistics, relative difference of Σ|g| and Σg²: {d['checksum_g']:.1e}, {d['checksum_g2']:.1e}")
    return "\n".join(lines) + f"\n\n`{result['command']}`\n"


def main() -> None:
    args = parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    import tempfile

    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds lists {sorted(unknown)}; allowed: {', '.join(KINDS)}")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = kinds if round_index % 2 == 0 else kinds[::-1]  # alternate the order too
            for name in order:
                runs[name].append(run_kind(args, name, Path(tmp)))
                print(f"round {round_index + 1}/{args.rounds} {name}: {runs[name][-1].get('seconds', 0):.1f}s", flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "windows": args.windows, "seq_len": args.seq_len, "rounds": args.rounds, "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summarize(runs), "runs": runs,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
