#!/usr/bin/env bash
# The whole accelerator check, spread over as many device calls (or sessions) as it takes:
#   pipeline    the reference pipeline (accelerator/accelerator_check.sh) in a process session of
#               its own, so that it runs on between two calls on a warm machine; each call
#               waits for it until its deadline and copies what it has so far to OUT;
#   profile     once no pipeline runs, on the otherwise idle device: the step profile
#               (benchmarks/profile_steps.py);
#   benchmarks  JAX and PyTorch side by side, float32 (benchmarks/benchmark.py);
#   bfloat16    the same for stage 1 and fine-tuning with --dtype bfloat16 (not by default);
#   flags       JAX's stage-1 and fine-tuning steps again under each XLA_FLAGS set of
#               DFQF_XLA_FLAG_SETS (';'-separated, an empty set is XLA's default; default:
#               XLA's default, command buffers (CUDA graphs) off, and command buffers that
#               also take in the cuDNN convolutions), one run_id, each row tagged with its
#               set (not by default). The fine-tuning step is host-paced on an H200 (35% of
#               its trace window idle, 4 us kernels): this measures whether XLA's CUDA
#               graphs can hide the launches; then benchmarks/loop_overhead.py (the host's
#               time per step of the training loop).
# A phase that exits 0 is marked done in WORK (default /tmp/dfqf_accelerator) and skipped by
# the next call on the same machine; one that failed or was cut runs again (the pipeline
# resumes from its checkpoints; the flags phase goes on with the sets it has not measured).
# A measuring phase starts only with the seconds it needs left (NEEDS below). The pipeline also runs again when its arguments change: it
# skips the stages it already finished (e.g. stage 1) and builds what is new.
#
#   accelerator/accelerator_session.sh OUT [SECONDS] [--config.field=value ...]
#
# SECONDS (default 560): when this call stops waiting and returns what it has. Size it (and
# the device call's timeout_s, a little above it) from the device time the session has left:
# the script cannot know the tool's limit, though what it has made is copied to OUT every
# minute and after every phase. The config overrides go to the pipeline; by default it
# evaluates stage 1's FP student and the fine-tuned students every 5 epochs instead of every
# epoch (monitoring only), checkpoints stage 1 every 2,400 iterations and the students every
# 5 epochs, and builds the W4A4 PTQ table only (both protocols, every calibration rule) plus
# the PTQ starts of the students asked for.
#
# Environment: DFQF_PHASES (default "pipeline profile benchmarks"; in that order),
# DFQF_SCHEDULE (default reference; smoke for a CPU try of the script), DFQF_PROFILE_ARGS and
# DFQF_BENCHMARK_ARGS (extra arguments, appended; also to the flags phase), DFQF_XLA_FLAG_SETS,
# DFQF_DATA_DIR, DFQF_RECORD_STEM and PYTHON
# as accelerator/accelerator_check.sh takes them. E.g. the four reference-schedule students
# (W4A4 and W3A3 under both protocols):
#   DFQF_PHASES=pipeline accelerator/accelerator_session.sh OUT 560 --config.bits=w4a4,w3a3 \
#     --config.finetune_stage.protocol=dfqf,standard
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: accelerator/accelerator_session.sh OUT [SECONDS] [--config.field=value ...]}
shift
WAIT=560
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then WAIT=$1; shift; fi
DEADLINE=$(( $(date +%s) + WAIT ))
WORK=${DFQF_ACCELERATOR_WORK:-/tmp/dfqf_accelerator}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
source accelerator/carried_wheels.sh

PHASES=" ${DFQF_PHASES:-pipeline profile benchmarks} "
PIPELINE_ARGS=$(printf ' %q' "${DFQF_SCHEDULE:-reference}" \
  --config.generator_stage.eval_every_epochs=5 \
  --config.generator_stage.checkpoint_every_steps=2400 \
  --config.finetune_stage.eval_every_epochs=5 \
  --config.finetune_stage.checkpoint_every_steps=1955 --config.ptq_stage.bits=w4a4 "$@")
seconds_left() { echo $(( DEADLINE - $(date +%s) )); }
wanted() { [[ "$PHASES" == *" $1 "* ]]; }
done_ok() { [ "$(cat "$WORK/$1.rc" 2>/dev/null)" = 0 ]; }
pipeline_running() { pgrep -f "accelerator_check.sh $WORK/pipeline" > /dev/null; }
# A measuring phase runs once the pipeline (when asked for) is done and none runs any more,
# and only with the seconds it needs left (a phase cut short is measured again next call).
declare -A NEEDS=([profile]=90 [benchmarks]=240 [bfloat16]=150 [flags]=90)
may_measure() {
  wanted "$1" && ! done_ok "$1" && ! pipeline_running && [ "$(seconds_left)" -gt "${NEEDS[$1]}" ] \
    && { done_ok pipeline || ! wanted pipeline; }
}

# What has been made so far goes to OUT, during the wait too: a call the device tool cuts off
# at its own limit still returns it. At most 7 files (a call returns at most 8): the record(s),
# in one archive everything written beside them (report, grid and curve images, the workdir's
# results.json and report.md), the profile and its traces, the benchmark rows, the logs.
collect() {
  for file in "$WORK"/pipeline/*.json; do
    [ "$(basename "$file")" = results.json ] || cp "$file" "$OUT/" 2>/dev/null
  done
  (cd "$WORK/pipeline" 2>/dev/null && tar -czf "$OUT/record_files.tar.gz" --exclude=./run \
    --exclude=./log.txt .) 2>/dev/null
  cp "$WORK/profile.json" "$WORK/benchmarks.jsonl" "$WORK/loop_overhead.jsonl" "$OUT/" 2>/dev/null
  [ -d "$WORK/traces" ] && tar -czf "$OUT/profile_traces.tar.gz" -C "$WORK" traces 2>/dev/null
  local logs
  logs=$(cd "$WORK" && ls pipeline.log profile.log benchmarks.log 2>/dev/null)
  [ -z "$logs" ] || tar -czf "$OUT/logs.tar.gz" -C "$WORK" $logs
}

new_args() { [ "$(cat "$WORK/pipeline.args" 2>/dev/null)" != "$PIPELINE_ARGS" ]; }
if wanted pipeline && pipeline_running && new_args; then
  echo "accelerator_session: a pipeline with other arguments is still running; this call" \
    "waits for it and measures nothing. Call again once it has finished." >&2
  PHASES=" pipeline "
elif wanted pipeline && ! pipeline_running; then
  if new_args || ! done_ok pipeline; then  # other students or settings: it builds what is new
    rm -f "$WORK/pipeline.rc"
    echo "$PIPELINE_ARGS" > "$WORK/pipeline.args"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$WORK/pipeline.log" 2>&1
    setsid nohup bash -c "accelerator/accelerator_check.sh $(printf %q "$WORK/pipeline") \
      $PIPELINE_ARGS >> $(printf %q "$WORK/pipeline.log") 2>&1; \
      echo \$? > $(printf %q "$WORK/pipeline.rc")" < /dev/null > /dev/null 2>&1 &
    sleep 2
  fi
fi
if wanted pipeline; then
  waited=0
  while pipeline_running && [ "$(seconds_left)" -gt 0 ]; do
    sleep 5
    waited=$(( waited + 5 ))
    (( waited % 60 )) || collect
  done
fi
collect

if may_measure profile; then
  rm -rf "$WORK/traces"
  timeout "$(seconds_left)" "$PYTHON" benchmarks/profile_steps.py --out "$WORK/profile.json" \
    --trace-dir "$WORK/traces" ${DFQF_PROFILE_ARGS:-} > "$WORK/profile.log" 2>&1
  echo $? > "$WORK/profile.rc"
  collect
fi

for dtype in float32 bfloat16; do
  phase=$([ $dtype = float32 ] && echo benchmarks || echo bfloat16)
  stages=$([ $dtype = float32 ] && echo teacher,generator,finetune,evaluate \
           || echo generator,finetune)
  if may_measure $phase; then
    timeout "$(seconds_left)" "$PYTHON" benchmarks/benchmark.py --impl jax,torch \
      --stages $stages --dtype $dtype --student-passes 1,2 --warmup 2 --repeats 5 \
      --out "$WORK/benchmarks.jsonl" --tag "accelerator session, $dtype" \
      ${DFQF_BENCHMARK_ARGS:-} >> "$WORK/benchmarks.log" 2>&1
    echo $? > "$WORK/$phase.rc"
    collect
  fi
done

# Each flag set measured is marked in WORK/flags.done: a call cut short goes on with the rest.
COMMAND_BUFFERS_WITH_CONVOLUTIONS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,\
CUSTOM_CALL,CUDNN,CONVOLUTION --xla_gpu_graph_min_graph_size=1"
if may_measure flags; then
  IFS=';' read -ra flag_sets <<< \
    "${DFQF_XLA_FLAG_SETS-;--xla_gpu_enable_command_buffer=;$COMMAND_BUFFERS_WITH_CONVOLUTIONS}"
  [ ${#flag_sets[@]} -gt 0 ] || flag_sets=("")  # DFQF_XLA_FLAG_SETS="": XLA's default alone
  [ -f "$WORK/flags.run_id" ] || date +%s | sha1sum | cut -c1-12 > "$WORK/flags.run_id"
  status=0
  for flags in "${flag_sets[@]}" "loop overhead"; do
    grep -qxF -- "$flags" "$WORK/flags.done" 2>/dev/null && continue
    [ "$(seconds_left)" -gt 60 ] || { status=124; break; }
    if [ "$flags" = "loop overhead" ]; then  # the training loop's host time per step
      timeout "$(seconds_left)" "$PYTHON" benchmarks/loop_overhead.py \
        --out "$WORK/loop_overhead.jsonl" --tag "accelerator session" \
        >> "$WORK/benchmarks.log" 2>&1
    else
      XLA_FLAGS="$flags" timeout "$(seconds_left)" "$PYTHON" benchmarks/benchmark.py \
        --impl jax --stages generator,finetune --warmup 2 --repeats 5 \
        --run-id "$(cat "$WORK/flags.run_id")" --out "$WORK/benchmarks.jsonl" \
        --tag "accelerator session, XLA_FLAGS: ${flags:-default}" ${DFQF_BENCHMARK_ARGS:-} \
        >> "$WORK/benchmarks.log" 2>&1
    fi
    rc=$?
    if [ $rc = 0 ]; then echo "$flags" >> "$WORK/flags.done"; else status=$rc; fi
  done
  echo $status > "$WORK/flags.rc"
  collect
fi
for phase in $PHASES; do
  echo "$phase: $(cat "$WORK/$phase.rc" 2>/dev/null || echo 'not finished')"
done
tail -5 "$WORK/pipeline.log" 2>/dev/null
