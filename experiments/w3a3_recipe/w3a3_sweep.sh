#!/usr/bin/env bash
# How the 3-bit fine-tuning recipe was chosen: 400-step W3A3 (dfqf protocol)
# runs from the calibrated start with the budget generator, compared on 5,000 training
# images held out as a validation split (val_top1_percent), never on the test split. The baseline
# is the budget recipe (BNs frozen, lr 1e-3 constant, clip lr 1e-4); each variant changes
# one switch (bn_train: the student's BNs in training mode, so their statistics are
# re-estimated on generated images, as in the reference; adversarial_generator_bn_train
# changes both). Each run writes
# experiments/w3a3_recipe/w3a3_sweep_<variant>.json; val_top1_percent is in its curves.
set -u  # a failed variant is reported and the sweep goes on
run="$(dirname "$0")/../short_finetune.sh"
export BITS=w3a3
budget=(--config.student_bn_train=False --config.steps_per_epoch=200 --config.num_epochs=2
        --config.checkpoint_every_steps=200)
variant() { name=$1; shift; "$run" "w3a3_sweep_$name" "experiments/w3a3_recipe/w3a3_sweep_$name.json" \
  "${budget[@]}" "$@"; }
variant baseline
variant clip_lr1e-3 --config.clip_learning_rate=0.001
variant lr_decay_at_1 "--config.lr_milestones=(1,)"
# The adversarial generator keeps training with the budget generator's own loss weights
# (configs/generator.py:cpu), as the pipeline passes them; runs/budget's generator was
# trained before its checkpoint recorded them, so they are given here.
adversarial=(--config.adversarial_generator=True --config.lambda_is=40.0 --config.lambda_bn=10.0
             --config.lambda_adv=5.0 --config.generator_learning_rate=0.005)
variant adversarial_generator "${adversarial[@]}"
variant adversarial_generator_bn_train "${adversarial[@]}" --config.student_bn_train=True
variant bn_train --config.student_bn_train=True
