#!/usr/bin/env bash
# How the budget fine-tuning recipe was chosen: 200-step runs from the calibrated W4A4
# start, compared on 5,000 training images held out as a validation split (val_top1_percent),
# never on the test split. Each run writes experiments/finetune_bn/finetune_sweep_<variant>.json.
# (Those records were made with SOURCE=runs/dfqf_cpu, the budget workdir of that time.)
set -u  # a failed variant is reported and the sweep goes on
run="$(dirname "$0")/../short_finetune.sh"
"$run" sweep_bn_train_lr1e-3 experiments/finetune_bn/finetune_sweep_bn_train_lr1e-3.json \
  --config.student_bn_train=True --config.learning_rate=0.001
"$run" sweep_bn_frozen_lr1e-3 experiments/finetune_bn/finetune_sweep_bn_frozen_lr1e-3.json \
  --config.student_bn_train=False --config.learning_rate=0.001
"$run" sweep_bn_train_lr1e-4 experiments/finetune_bn/finetune_sweep_bn_train_lr1e-4.json \
  --config.student_bn_train=True --config.learning_rate=0.0001
