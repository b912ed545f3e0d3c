#!/usr/bin/env bash
# bash scripts/gpu_fsdp_recovery.sh OUT_DIR [MODEL_DIR]
#
# The recovery job under FSDP on this machine's GPUs (configs/recover_smollm2.yaml +
# configs/recover_smollm2_fsdp.yaml), run twice: killed abruptly at step 22, then resumed from the
# sharded checkpoint of step 20, to 30 steps. MODEL_DIR defaults to a SmolLM2-135M-shaped model with
# random weights built from the config and tokenizer in .gpu/ (for machines without the bundled
# model; the FSDP, LoRA, checkpoint and export mechanics are the same).
#
# Expected output: the first run exits with code 13 after pruning and 22 steps; the second
# logs "resuming from ...: pruned architecture rebuilt from the saved plan, estimation skipped",
# trains steps 20..30, merges the adapters, and writes OUT_DIR/run/export/ (model, adapter/,
# report.json with recovery.loss_curve and the perplexity); the script prints the summary JSON.
set -euo pipefail
OUT=$(realpath "${1:?usage: gpu_fsdp_recovery.sh OUT_DIR [MODEL_DIR]}")
MODEL=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ -z "$MODEL" ]; then
  MODEL="$OUT/random-smollm2"
  python - "$MODEL" <<'EOF'
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig.from_pretrained(".gpu")
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(".gpu").save_pretrained(sys.argv[1])
EOF
fi
ARGS=(--config configs/recover_smollm2.yaml --config configs/recover_smollm2_fsdp.yaml
      --model.init_args.model_name_or_path "$MODEL" --trainer.max_steps 30 --trainer.val_check_interval 10
      --trainer.default_root_dir "$OUT/run")
CKPT="$OUT/run/checkpoints"  # every path of the run derives from trainer.default_root_dir
set +e
python main.py fit "${ARGS[@]}" --trainer.callbacks+=tests.crash.CrashAtStep --trainer.callbacks.step=22 \
  > "$OUT/first.log" 2>&1
echo "first run exit code: $? (13 = killed as planned)"
set -e
ls "$CKPT"
python main.py fit "${ARGS[@]}" --ckpt_path "$CKPT/epoch=0-step=20.ckpt" > "$OUT/resumed.log" 2>&1
grep -h "resuming from\|pruned .* parameters\|perplexity" "$OUT/first.log" "$OUT/resumed.log" || true
python - "$OUT/run/export" <<'EOF'
import json, sys
report = json.load(open(f"{sys.argv[1]}/report.json"))
recovery = report["recovery"]
print(json.dumps({
    "strategy": recovery["strategy"], "world_size": recovery["world_size"], "steps": recovery["steps"],
    "first_loss": recovery["loss_curve"][0], "last_loss": recovery["loss_curve"][-1],
    "val_loss": recovery["val_loss"], "perplexity": report.get("perplexity"),
    "memory": report.get("memory"), "seconds": report.get("seconds"),
}, indent=1))
EOF
ls "$OUT/run/export" "$OUT/run/export/adapter"
