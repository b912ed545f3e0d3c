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
exit $status
