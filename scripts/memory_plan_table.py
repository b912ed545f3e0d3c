"""The memory plan by arithmetic for 7B/13B/70B models on 1, 2, 8 and 16 GPUs (docs/performance.md).

The job is configs/prune_llama.yaml's (HyWIA Element² + fluctuation over layers 4..L-2, 64 windows
of 128 tokens, independent reconstruction, perplexity) followed by LoRA recovery with LLM-Pruner's
recipe (r 8 on every projection, 256 tokens, global batch 64) under DecoderLayerFSDP with
activation checkpointing; weights and accumulators in bfloat16 unless a row says otherwise.
Per-rank GiB, the GPU runtime (1 GiB) included. On several GPUs the g/g² accumulators are sharded
over the ranks (``shard_accumulators``, the default); the last column is the same job with
``shard_accumulators: false``, and the column before it the job with ``shard_weights: true``
(FSDP2 shards the dense and then the pruned weights for every stage up to the export; such a job
recovers its export in a second job). Without it the weights stay whole on every rank until recovery.

    python scripts/memory_plan_table.py
"""

from __future__ import annotations

from dataclasses import replace

from hywia_lightning.memory_plan.stages import (
    EstimationSettings, EvaluationSettings, JobSettings, ReconstructionSettings, RecoverySettings, plan_memory,
)
from hywia_lightning.models.shapes import resolve_shape

MODELS = {"Llama-2-7B": "meta-llama/Llama-2-7b-hf", "Llama-2-13B": "meta-llama/Llama-2-13b-hf",
          "Llama-2-70B": "meta-llama/Llama-2-70b-hf"}
GPUS = {1: (1, 1), 2: (2, 1), 8: (8, 1), 16: (8, 2)}


def job(layers: int, dtype: str, devices: int, nodes: int, shards: int) -> JobSettings:
    estimation = EstimationSettings(needs=frozenset({"squared_gradients", "input_moments"}), layers=tuple(range(4, layers - 2)),
                                    accumulate_dtype=dtype, num_windows=64, seq_len=128)
    return JobSettings(dtype=dtype, devices=devices, num_nodes=nodes, accelerator="gpu", target_ratio=0.2,
                       estimation=estimation, reconstruction=ReconstructionSettings(seq_len=128),
                       perplexity=EvaluationSettings(8, 128),
                       recovery=RecoverySettings(batch_size=64, seq_len=256, activation_checkpointing=True, fsdp=True),
                       estimation_shards=shards)


def gib(plan, stage: str) -> str:
    found = [s for s in plan.stages if s.stage == stage]
    return f"{found[0].gib:.1f}" if found else "–"


def rows() -> list[str]:
    lines = ["| model | weights, accumulators | GPUs | estimation | scoring | reconstruction | LoRA recovery (FSDP) | "
             "peak per rank | fits 80 GB? | shard_weights: estimation / scoring / reconstruction / slicing, peak | "
             "shard_accumulators false: estimation / scoring |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for label, name in MODELS.items():
        shape = resolve_shape(name)[0]
        for dtype in (["float32", "bfloat16"] if label == "Llama-2-7B" else ["bfloat16"]):
            for gpus, (devices, nodes) in GPUS.items():
                plan = plan_memory(shape, job(shape.num_hidden_layers, dtype, devices, nodes, devices * nodes))
                whole = plan_memory(shape, replace(plan.job, estimation_shards=1))
                fits = "yes" if plan.peak.bytes <= 80e9 else f"no ({plan.peak.stage})"
                sharded = plan_memory(shape, replace(plan.job, shard_weights=True))
                weights = "–" if gpus == 1 else (
                    " / ".join(gib(sharded, s) for s in ("estimation", "scoring", "reconstruction", "slicing")) +
                    f", {sharded.peak_gib:.1f} ({'fits' if sharded.peak.bytes <= 80e9 else sharded.peak.stage})")
                lines.append(f"| {label} | {dtype} | {gpus} | {gib(plan, 'estimation')} | {gib(plan, 'scoring')} | "
                             f"{gib(plan, 'reconstruction')} | {gib(plan, 'recovery')} | {plan.peak_gib:.1f} | {fits} | "
                             f"{weights} | {gib(whole, 'estimation')} / {gib(whole, 'scoring')} |")
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
