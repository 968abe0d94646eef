#!/usr/bin/env bash
# The accuracy effect of config.compute_dtype=bfloat16 on training: the same 200-step W4A4
# fine-tuning (the budget recipe: BNs frozen, lr 1e-3) in float32 and in bfloat16. Writes
# experiments/mixed_precision/mixed_precision_w4a4_{float32,bfloat16}.json.
set -eu
run="$(dirname "$0")/../short_finetune.sh"
for dtype in float32 bfloat16; do
  "$run" "mixed_precision_${dtype}" "experiments/mixed_precision/mixed_precision_w4a4_${dtype}.json" \
    --config.student_bn_train=False --config.learning_rate=0.001 --config.compute_dtype="$dtype"
done
