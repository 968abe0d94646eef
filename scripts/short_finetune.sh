#!/usr/bin/env bash
# One 200-step W4A4 fine-tuning from the calibrated start, scored on 5,000 training images
# held out as a validation split (val_top1): scripts/short_finetune.sh NAME RECORD [FLAGS...]
# Runs in runs/NAME with the teacher and generator of runs/dfqf_cpu (the budget run's first
# stages), writes the run record RECORD (a path from the repository root) and prints
# val_top1 per logged step.
set -eu
cd "$(dirname "$0")/.."
name=$1; record=$2; shift 2
if [ ! -d runs/dfqf_cpu/generator ]; then
  echo "short_finetune.sh: runs/dfqf_cpu/{teacher,generator} are missing; run the budget" \
       "pipeline's first stages (README, Reproducing the paper) first." >&2
  exit 2
fi
dir="runs/${name}"
rm -rf "$dir"; mkdir -p "$dir"
ln -s "$(pwd)/runs/dfqf_cpu/teacher" "$dir/teacher"
ln -s "$(pwd)/runs/dfqf_cpu/generator" "$dir/generator"
XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python main.py \
  --config=configs/finetune.py:w4a4 --workdir="$dir" --config.data.dir=../shared/data \
  --config.data.validation_size=5000 --config.steps_per_epoch=100 --config.num_epochs=2 \
  --config.record_to="$record" "$@" > "$dir.log" 2>&1 \
  || { echo "$name failed; see $dir.log" >&2; exit 1; }
echo "$name"; grep val_top1 "$dir/student_w4a4/metrics.jsonl" | python3 -c "
import sys, json
for l in sys.stdin: r = json.loads(l); print('  step', r['step'], 'val_top1', r['val_top1'])"
