#!/usr/bin/env bash
# How the budget fine-tuning recipe was chosen: 200-step runs from the calibrated W4A4
# start, compared on 5,000 training images held out as a validation split (val_top1),
# never on the test split. Needs runs/dfqf_cpu/{teacher,generator} (the budget run's first
# stages). Each run writes docs/results/finetune_sweep_<variant>.json.
set -u
cd "$(dirname "$0")/.."
for variant in "bn_train_lr1e-3:--config.student_bn_train=True --config.learning_rate=0.001" \
               "bn_frozen_lr1e-3:--config.student_bn_train=False --config.learning_rate=0.001" \
               "bn_train_lr1e-4:--config.student_bn_train=True --config.learning_rate=0.0001"; do
  name=${variant%%:*}; flags=${variant#*:}; dir="runs/sweep_${name}"
  rm -rf "$dir"; mkdir -p "$dir"
  ln -s "$(pwd)/runs/dfqf_cpu/teacher" "$dir/teacher"
  ln -s "$(pwd)/runs/dfqf_cpu/generator" "$dir/generator"
  XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python main.py \
    --config=configs/finetune.py:w4a4 --workdir="$dir" --config.data.dir=../shared/data \
    --config.data.validation_size=5000 --config.steps_per_epoch=100 --config.num_epochs=2 \
    --config.record_to="docs/results/finetune_sweep_${name}.json" $flags > "$dir.log" 2>&1
  echo "$name"; grep val_top1 "$dir/student_w4a4/metrics.jsonl" | python3 -c "
import sys, json
for l in sys.stdin: r = json.loads(l); print('  step', r['step'], 'val_top1', r['val_top1'])"
done
