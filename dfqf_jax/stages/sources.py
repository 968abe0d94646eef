"""Where a fine-tuned student's images come from (config.images): DFQF's generator (the
fine-tuning stage's own path), ZeroQ's distilled set or GDFQ's conditional generator.

Everything else of fine-tuning (calibrated start, protocol, optimizer, steps x batch, loop,
checkpoints, evaluation) is the same for every source: a source only supplies the images
(and, for GDFQ, its own student loss and the generator that keeps training alongside).
"""
from typing import Callable, NamedTuple

IMAGES = ("dfqf", "zeroq", "gdfq")


class ImageSource(NamedTuple):
  """What fine-tuning takes from a source other than DFQF's generator.

  lineage: {stage: origin} of the checkpoint the images come from.
  calibration_batches(config, key) -> the normalized batches that calibrate the start.
  generator: (module, variables, optimizer state, optimizer) kept training alongside the
    student, or None.
  hyper: the step's static settings (finetune reads batch_size and student_bn_train).
  step(state, inputs, teacher_vars) -> (state, metrics), or None: fine-tuning's KD step on
    the images `inputs`.
  inputs(step, base_key) -> the step's inputs (its key, or a global batch of images).
  """
  lineage: dict
  calibration_batches: Callable
  generator: tuple | None
  hyper: object
  step: Callable | None
  inputs: Callable
