#!/bin/bash
# PTQ and a short fine-tuning of a W4A4 student with layer3 at 8 bits, export,
# evaluation with a run record, and the integer model against the fake-quantized one.
set -x
cd "$(dirname "$0")/../.."
W=${W:-/tmp/mixed_precision_rules}
SMOKE=${SMOKE:?a smoke pipeline workdir (configs/pipeline.py:smoke) holding teacher/ and generator/}
# The records were made when the smoke generator had the reference width; a smoke workdir like
# theirs now: configs/pipeline.py:smoke --config.generator_stage.generator.width=128.
rm -rf $W && mkdir -p $W && cp -r "$SMOKE"/teacher "$SMOKE"/generator $W/
D="--config.data.dir=../shared/data"
R="--config.rules=layer3.*=w8a8"
E=experiments/mixed_precision_rules
date
.venv/bin/python main.py --config=configs/ptq.py:w4a4 --workdir=$W $D $R; echo "rc=$?"
.venv/bin/python main.py --config=configs/ptq.py:w4a4 --workdir=$W $D; echo "rc=$?"
.venv/bin/python main.py --config=configs/finetune.py:w4a4 --workdir=$W $D $R \
  --config.steps_per_epoch=50 --config.num_epochs=1 --config.batch_size=64 \
  --config.student_bn_train=False --config.log_every_steps=10 --config.checkpoint_every_steps=50; echo "rc=$?"
.venv/bin/python main.py --config=configs/export.py:student_w4a4_layer3-w8a8 --workdir=$W $D; echo "rc=$?"
.venv/bin/python main.py --config=configs/evaluate.py --workdir=$W $D --config.record_to=$E/record.json; echo "rc=$?"
.venv/bin/python -c "
import json, sys
from dfqf_jax import report
r = json.load(open('$W/results.json'))
for n in sorted(r):
  rules, avg = report.quantization_of(r[n])
  print(f'| {n} | {100*r[n][\"top1\"]:.2f}% | {rules} | {avg} |')
"
.venv/bin/python -m dfqf_jax.tools.integer_check --names student_w4a4_layer3-w8a8 --workdir=$W \
  --test-images 2000 --out $E/integer_check.json; echo "rc=$?"
.venv/bin/python main.py --config=configs/ptq.py:w4a4 --workdir=$W $D --config.rules='layer4.*=w8a8'; echo "rc=$?"
date
