#!/usr/bin/env bash
# Every cell of the like-for-like table (README.md): ResNet-20, the imported teacher, one
# workdir per image source and seed; in each, W4A4 under the standard protocol, W3A3 standard,
# then W4A4 under DFQF's protocol (the issue's order of priority). Every invocation writes its
# run record into $RECORDS; at the end the table goes to $RECORDS/table.md.
#
# Resumable: rerun the same command after an interruption; a run whose record exists is
# skipped (delete the record to redo it), an interrupted one continues from its last checkpoint.
#
#   experiments/like_for_like/run.sh                      # the budget table, seeds 0 1 2
#   SCHEDULE=smoke SEEDS=0 experiments/like_for_like/run.sh   # a minutes-long check
# Settings (environment): SCHEDULE (budget | smoke | reference), SEEDS, SOURCES, CELLS,
# DATA (cifar10_*.npz), TEACHER (weights .npz), RUNS (workdirs), RECORDS, PYTHON.
# Further arguments go to every main.py call (e.g. --config.compute_dtype=bfloat16).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
SCHEDULE=${SCHEDULE:-budget}
SEEDS=${SEEDS:-"0 1 2"}
SOURCES=${SOURCES:-"dfqf zeroq gdfq"}
CELLS=${CELLS:-"w4a4:standard w3a3:standard w4a4:dfqf"}
DATA=${DATA:-$repo/../shared/data}
TEACHER=${TEACHER:-$repo/../shared/data/resnet20-12fca82f_weights.npz}
RUNS=${RUNS:-$repo/runs/like_for_like_$SCHEDULE}
RECORDS=${RECORDS:-$here/$SCHEDULE}
PYTHON=${PYTHON:-$repo/.venv/bin/python}
mkdir -p "$RECORDS"
cd "$repo"
for cell in $CELLS; do
  bits=${cell%%:*} protocol=${cell##*:}
  for seed in $SEEDS; do
    for source in $SOURCES; do
      record="$RECORDS/${source}_seed${seed}_${bits}_$protocol.json"
      if [[ -f "$record" ]]; then
        echo "like_for_like: $source seed $seed $bits $protocol: $record exists; skipped"
        continue
      fi
      echo "like_for_like: $source seed $seed $bits $protocol ($SCHEDULE)"
      "$PYTHON" main.py --config="configs/pipeline.py:$SCHEDULE" \
        --workdir="$RUNS/${source}_seed$seed" --config.data.dir="$DATA" \
        --config.teacher_weights="$TEACHER" --config.images="$source" --config.seed="$seed" \
        --config.bits="$bits" --config.finetune_stage.protocol="$protocol" \
        --config.record_to="$record" "$@"
    done
  done
done
"$PYTHON" -m dfqf_jax.report --compare "$RECORDS"/*_seed*.json --out "$RECORDS/table.md"
