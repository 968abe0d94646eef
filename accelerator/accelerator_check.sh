#!/usr/bin/env bash
# One-call accelerator reproduction: the DFQF pipeline (W4A4, imported ResNet-20 teacher) on
# whatever accelerator JAX finds, writing results.json, report.md, the run record and the log
# to OUT_DIR.
#
#   accelerator/accelerator_check.sh OUT_DIR [reference|budget|smoke] [--config.field=value ...]
#
# Needs only the test split and the teacher weights: DFQF_DATA_DIR (default ../shared/data)
# must hold cifar10_test.npz and resnet20-12fca82f_weights.npz. Wheels in .whl/ (if present)
# are installed first, for machines without a package index. DFQF_RECORD_STEM names the record
# (default reference_<platform>_<device kind>).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: accelerator/accelerator_check.sh OUT_DIR [schedule] [config overrides]}
SCHEDULE=${2:-reference}
shift $(( $# >= 2 ? 2 : 1 ))
DATA=${DFQF_DATA_DIR:-../shared/data}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
source accelerator/carried_wheels.sh
if [ -n "${DFQF_RECORD_STEM:-}" ]; then
  RECORD="$OUT/$DFQF_RECORD_STEM.json"  # (naming the device would start the backend once more)
else
  DEVICE=$("$PYTHON" -c "import jax; d = jax.devices()[0]; print(d.platform + '_' + d.device_kind.replace(' ', '_').lower())")
  RECORD="$OUT/reference_${DEVICE}.json"
fi
start=$(date +%s)
"$PYTHON" main.py --config="configs/pipeline.py:${SCHEDULE}" --workdir="$OUT/run" \
  --config.data.dir="$DATA" --config.teacher_weights="$DATA/resnet20-12fca82f_weights.npz" \
  --config.record_to="$RECORD" "$@" 2>&1 | tee "$OUT/log.txt"
cp "$OUT/run/results.json" "$OUT/run/report.md" "$OUT/"
echo "accelerator_check: $SCHEDULE took $(( $(date +%s) - start )) s; record: $RECORD"
