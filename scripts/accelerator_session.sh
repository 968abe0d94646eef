#!/usr/bin/env bash
# Issue 14's whole accelerator check, spread over as many device calls as it takes:
#   1. the reference pipeline (scripts/accelerator_check.sh) in a process session of its own,
#      so that it runs on between two calls on a warm machine; each call waits for it until
#      its deadline and copies what it has so far to OUT;
#   2. once it has finished, on the otherwise idle device: the step profile
#      (benchmarks/profile_steps.py), then the benchmarks, JAX and PyTorch side by side
#      (benchmarks/benchmark.py).
# Each phase leaves a mark in WORK (default /tmp/dfqf_accelerator), so the next call on the
# same machine goes on where this one stopped; a cut pipeline resumes from its checkpoints.
#
#   scripts/accelerator_session.sh OUT [SECONDS] [--config.field=value ...]
#
# Environment: DFQF_PHASES (default "pipeline profile benchmarks": the phases to run, in that
# order), DFQF_SCHEDULE (default reference; smoke for a CPU try of the script),
# DFQF_PROFILE_ARGS and DFQF_BENCHMARK_ARGS (extra arguments, appended), DFQF_DATA_DIR and
# DFQF_RECORD_STEM and PYTHON as scripts/accelerator_check.sh takes them. E.g. the four
# reference students of issue 19, without the profile and benchmarks:
#   DFQF_PHASES=pipeline scripts/accelerator_session.sh OUT 560 --config.bits=w4a4,w3a3 \
#     --config.finetune_stage.protocol=dfqf,standard
#
# SECONDS (default 560): when this call stops waiting and returns what it has. The config
# overrides go to the pipeline; by default it evaluates stage 1's FP student every 5 epochs
# instead of every epoch (monitoring only), checkpoints stage 1 every 2,400 iterations, and
# builds the W4A4 PTQ table only (both protocols, every calibration rule).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/accelerator_session.sh OUT [SECONDS] [--config.field=value ...]}
DEADLINE=$(( $(date +%s) + ${2:-560} ))
shift $(( $# >= 2 ? 2 : 1 ))
WORK=${DFQF_ACCELERATOR_WORK:-/tmp/dfqf_accelerator}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
source scripts/carried_wheels.sh

PHASES=" ${DFQF_PHASES:-pipeline profile benchmarks} "
seconds_left() { echo $(( DEADLINE - $(date +%s) )); }
wanted() { [[ "$PHASES" == *" $1 "* ]]; }

if wanted pipeline && [ ! -e "$WORK/pipeline.rc" ]; then
  if ! pgrep -f "accelerator_check.sh $WORK/pipeline" > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$WORK/pipeline.log" 2>&1
    setsid nohup bash -c "scripts/accelerator_check.sh $WORK/pipeline ${DFQF_SCHEDULE:-reference} \
      --config.generator_stage.eval_every_epochs=5 \
      --config.generator_stage.checkpoint_every_steps=2400 \
      --config.ptq_stage.bits=w4a4 $* >> $WORK/pipeline.log 2>&1; echo \$? > $WORK/pipeline.rc" \
      < /dev/null > /dev/null 2>&1 &
  fi
  while [ ! -e "$WORK/pipeline.rc" ] && [ "$(seconds_left)" -gt 0 ]; do sleep 5; done
fi
cp "$WORK/pipeline.log" "$OUT/" 2>/dev/null
# The record, and in one archive everything written beside it (its report, grid and curve
# images, the workdir's results.json and report.md): a device call returns at most 8 files.
for file in "$WORK"/pipeline/*.json; do
  [ "$(basename "$file")" = results.json ] || cp "$file" "$OUT/" 2>/dev/null
done
(cd "$WORK/pipeline" 2>/dev/null && tar -czf "$OUT/record_files.tar.gz" --exclude=./run \
  --exclude=./log.txt .) 2>/dev/null

if wanted profile && { [ -e "$WORK/pipeline.rc" ] || ! wanted pipeline; } \
    && [ ! -e "$WORK/profile.rc" ] && [ "$(seconds_left)" -gt 60 ]; then
  timeout "$(seconds_left)" "$PYTHON" benchmarks/profile_steps.py --out "$WORK/profile.json" \
    --trace-dir "$WORK/traces" ${DFQF_PROFILE_ARGS:-} > "$WORK/profile.log" 2>&1
  echo $? > "$WORK/profile.rc"
  tar -czf "$OUT/profile_traces.tar.gz" -C "$WORK" traces profile.log 2>/dev/null
fi
cp "$WORK/profile.json" "$OUT/" 2>/dev/null

if wanted benchmarks && { [ -e "$WORK/pipeline.rc" ] || ! wanted pipeline; } \
    && { [ -e "$WORK/profile.rc" ] || ! wanted profile; } \
    && [ ! -e "$WORK/benchmarks.rc" ] && [ "$(seconds_left)" -gt 60 ]; then
  timeout "$(seconds_left)" "$PYTHON" benchmarks/benchmark.py --impl jax,torch \
    --stages teacher,generator,finetune,evaluate --student-passes 1,2 --warmup 3 --repeats 10 \
    --out "$WORK/benchmarks.jsonl" --tag "issue 14: accelerator session, float32" ${DFQF_BENCHMARK_ARGS:-} \
    > "$WORK/benchmarks.log" 2>&1
  echo $? > "$WORK/benchmarks.rc"
fi
cp "$WORK/benchmarks.jsonl" "$WORK/benchmarks.log" "$OUT/" 2>/dev/null
for phase in $PHASES; do
  echo "$phase: $(cat "$WORK/$phase.rc" 2>/dev/null || echo 'not finished')"
done
tail -5 "$WORK/pipeline.log"
