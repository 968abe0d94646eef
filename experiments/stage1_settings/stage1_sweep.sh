#!/usr/bin/env bash
# Stage-1 settings compared side by side: one main.py process per setting, all at once on
# whatever accelerator JAX finds (or the CPU), the FP student measured on 5,000 held-out
# *training* images (data.validation_size) so that the choice never looks at the test split.
#
#   experiments/stage1_settings/stage1_sweep.sh OUT_DIR SCHEDULE SECONDS NAME=OVERRIDES [NAME=OVERRIDES ...]
#
# SCHEDULE: configs/generator.py's argument (reference|cpu|smoke). OVERRIDES: comma-separated
# config fields, e.g. "lambda_bn=1,generator.reference_quirks=False" ("" for the recipe as is).
# SECONDS: wall limit per run; a run still going then gets SIGTERM, saves its step and writes
# its record with stopped_early_at_step. Each run writes OUT_DIR/NAME.json (run record, curves)
# and OUT_DIR/NAME/; OUT_DIR/sweep.txt lists the final and best validation top-1 per setting.
# DFQF_DATA_DIR (default ../shared/data) needs cifar10_test.npz, cifar10_train.npz and
# resnet20-12fca82f_weights.npz. Wheels in .whl/ (if present) are installed first.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: experiments/stage1_settings/stage1_sweep.sh OUT_DIR SCHEDULE SECONDS NAME=OVERRIDES ...}
SCHEDULE=${2:?schedule}
SECONDS_PER_RUN=${3:?seconds}
shift 3
DATA=${DFQF_DATA_DIR:-../shared/data}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
source accelerator/carried_wheels.sh
# Several processes share one accelerator: allocate memory as needed, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
"$PYTHON" main.py --config=configs/import_teacher.py --workdir="$OUT/teacher_import" \
  --config.weights="$DATA/resnet20-12fca82f_weights.npz" > "$OUT/teacher_import.log" 2>&1 \
  || { tail -30 "$OUT/teacher_import.log"; exit 1; }
for setting in "$@"; do
  name=${setting%%=*}
  overrides=()
  IFS=',' read -ra fields <<< "${setting#*=}"
  for field in "${fields[@]}"; do [ -n "$field" ] && overrides+=("--config.$field"); done
  timeout --signal=TERM --kill-after=120 "$SECONDS_PER_RUN" \
    "$PYTHON" main.py --config="configs/generator.py:$SCHEDULE" --workdir="$OUT/$name" \
    --config.teacher_dir="$OUT/teacher_import/teacher" --config.data.dir="$DATA" \
    --config.data.validation_size=5000 --config.record_to="$OUT/$name.json" \
    "${overrides[@]}" > "$OUT/$name.log" 2>&1 &
done
wait
"$PYTHON" - "$OUT" "$@" <<'PY' | tee "$OUT/sweep.txt"
import os, sys
from dfqf_jax.training import read_metrics
out = sys.argv[1]
print(f"{'setting':<16} {'steps':>6} {'val top-1 final':>16} {'val best (step)':>18} "
      f"{'L_BN final':>10} {'test top-1 final':>16}")
for setting in sys.argv[2:]:
  name = setting.split("=", 1)[0]
  rows = read_metrics(os.path.join(out, name, "generator"))
  evals = [r for r in rows if "student_val_top1_percent" in r]
  bn = [r["loss_bn"] for r in rows if "loss_bn" in r]
  if not evals:
    print(f"{name:<16} failed or no evaluation: see {name}.log"); continue
  best = max(evals, key=lambda r: r["student_val_top1_percent"])
  print(f"{name:<16} {evals[-1]['step']:>6} {evals[-1]['student_val_top1_percent']:>16.2f} "
        f"{best['student_val_top1_percent']:>10.2f} ({best['step']:>5}) {bn[-1]:>10.3f} "
        f"{evals[-1]['student_test_top1_percent']:>16.2f}")
PY
