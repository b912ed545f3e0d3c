#!/usr/bin/env bash
# Pruned-model speed on a CUDA GPU: dense vs 50%-pruned widths, bf16, random weights, forward and
# generate, interleaved (scripts/benchmark_speed.py). Needs only torch and transformers (no bundled
# model, no network, no Lightning/plotting): run from the repository root,
#
#     bash scripts/gpu_checks.sh OUT_DIR
#
# and it writes OUT_DIR/speed_gpu_smollm2.{json,md} and OUT_DIR/speed_gpu_llama7b.{json,md}.
# The pruned widths are those the pruning callback gives for 50% of the parameters (layers 4..27 of
# SmolLM2's 30, as the benchmark protocol; 4..29 of Llama-7B's 32, as LLM-Pruner), at round_to 1, 8,
# 64 and 128. About 2 minutes on an H200.
#
# On a machine with 2 or more GPUs it also runs the sharded g/g² accumulators on 2 ranks over NCCL
# against 1 rank (scripts/benchmark_sharded_estimation.py: the bundled model, 16 windows; it needs
# this project's requirements, Lightning included) and writes OUT_DIR/sharded_estimation_gpu.{json,md};
# with one GPU it says it skipped (NCCL cannot put two ranks on one GPU). Then the same with the
# weights sharded too (FSDP2's fully_shard per decoder layer, sliced by gathering one layer at a time
# onto rank 0: --shard-weights), OUT_DIR/fsdp2_estimation_gpu.{json,md}: the same plan, half the
# weight and g/g² bytes per rank, and rank 0's sliced weights against 1 rank's. Not run yet on any GPU.
set -uo pipefail
status=0
OUT="${1:-gpu_results}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
"$PYTHON" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" || exit 1

# the model of this project's benchmark: small matrices, so launch overhead shows (batch 32 × 512 tokens)
timeout 100 "$PYTHON" scripts/benchmark_speed.py --random-weights smollm2-135m --device cuda --dtype bfloat16 \
    --layers 4:28 --round-to 1,8,64,128 --batch-size 32 --seq-len 512 --gen-batch-size 32 --prompt-len 32 \
    --new-tokens 64 --repeats 10 --out-dir "$OUT" --name speed_gpu_smollm2 || status=1

# a 7B shape, where the matrix products dominate (batch 8 × 512 tokens)
timeout 120 "$PYTHON" scripts/benchmark_speed.py --random-weights llama-7b --device cuda --dtype bfloat16 \
    --layers 4:30 --round-to 1,8,64,128 --batch-size 8 --seq-len 512 --gen-batch-size 8 --prompt-len 32 \
    --new-tokens 32 --repeats 5 --out-dir "$OUT" --name speed_gpu_llama7b || status=1

# sharded accumulators: the same plan on 2 ranks as on 1, half the g/g² bytes per rank (under a minute)
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    timeout 240 "$PYTHON" scripts/benchmark_sharded_estimation.py --device cuda --windows 16 --out-dir "$OUT" \
        --name sharded_estimation_gpu || status=1
    # FSDP2: the weights sharded as well (under a minute)
    timeout 120 "$PYTHON" scripts/benchmark_sharded_estimation.py --device cuda --windows 8 --shard-weights \
        --out-dir "$OUT" --name fsdp2_estimation_gpu || status=1
else
    echo "sharded estimation on GPUs skipped: it needs 2 GPUs (NCCL cannot put two ranks on one)"
fi
exit $status
