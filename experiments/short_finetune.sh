#!/usr/bin/env bash
# One short fine-tuning from the calibrated start, scored on 5,000 training images held out
# as a validation split (val_top1_percent): experiments/short_finetune.sh NAME RECORD [FLAGS...]
# Runs in runs/NAME with the teacher and generator of $SOURCE (default runs/budget, the
# budget pipeline's first stages), fine-tunes the $BITS student (default w4a4; 200 steps
# unless FLAGS say otherwise), writes the run record RECORD (a path from the repository
# root) and prints val_top1_percent per evaluation.
set -eu
cd "$(dirname "$0")/.."
name=$1; record=$2; shift 2
source_dir=${SOURCE:-runs/budget}
bits=${BITS:-w4a4}
if [ ! -d "$source_dir/generator" ]; then
  echo "short_finetune.sh: $source_dir/{teacher,generator} are missing; run the budget" \
       "pipeline's first stages (experiments/budget_resnet20/README.md) or set SOURCE." >&2
  exit 2
fi
dir="runs/${name}"
rm -rf "$dir"; mkdir -p "$dir"
ln -s "$(pwd)/$source_dir/teacher" "$dir/teacher"
ln -s "$(pwd)/$source_dir/generator" "$dir/generator"
XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python main.py \
  --config="configs/finetune.py:$bits" --workdir="$dir" --config.data.dir=../shared/data \
  --config.data.validation_size=5000 --config.steps_per_epoch=100 --config.num_epochs=2 \
  --config.record_to="$record" "$@" > "$dir.log" 2>&1 \
  || { echo "$name failed; see $dir.log" >&2; exit 1; }
echo "$name"; grep -h val_top1_percent "$dir/student_$bits"*/metrics.jsonl | python3 -c "
import sys, json
for l in sys.stdin: r = json.loads(l); print('  step', r['step'], 'val_top1_percent', r['val_top1_percent'])"
