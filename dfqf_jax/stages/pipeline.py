"""The whole DFQF pipeline: teacher -> generator -> calibration + fine-tuning -> PTQ
baselines -> evaluation -> report.

Every stage resumes from its own checkpoints, so a finished stage costs nothing when the
pipeline is rerun, and an interrupted one continues where it stopped. Each stage folder
keeps its wall time summed over invocations (wall_seconds.json) for the report.
"""
import copy

from dfqf_jax import report, storage, validation
from dfqf_jax.stages import (evaluate, finetune, generator, import_teacher, ptq,
                             teacher)

SHARED_DATA_FIELDS = ("name", "dir", "validation_size")


def stage_configs(config) -> list:
  """(name, run, validate, config) for each stage, with the pipeline's data settings."""
  def with_shared(sub):
    sub = copy.deepcopy(sub)
    sub.unlock()
    sub.seed = config.seed
    for field in SHARED_DATA_FIELDS:
      sub.data[field] = config.data[field]
    sub.model.depth = config.model.depth
    sub.compute_dtype = config.compute_dtype
    sub.on_stale_upstream = "rebuild"
    return sub

  stages = []
  if config.teacher_weights:
    sub = with_shared(config.import_stage)
    sub.weights = config.teacher_weights
    stages.append(("teacher", import_teacher.run, validation.import_teacher, sub))
  else:
    stages.append(("teacher", teacher.run, validation.teacher, with_shared(config.teacher_stage)))
  stages.append(("generator", generator.run, validation.generator,
                 with_shared(config.generator_stage)))
  for bits in ptq.split_names(config.bits):
    sub = with_shared(config.finetune_stage)
    sub.bits = bits
    stages.append((f"finetune_{bits}", finetune.run, validation.finetune, sub))
  stages.append(("ptq", lambda c, w: ptq.run(c, w, evaluate_after=False), validation.ptq,
                 with_shared(config.ptq_stage)))
  return stages


def validate(config) -> None:
  validation.common(config, splits=("test",))  # each stage checks the splits it reads
  if not ptq.split_names(config.bits):
    raise validation.ConfigError(f"config.bits={config.bits!r} names no student to fine-tune; "
                                 "give one or more of w<W>a<A>, e.g. --config.bits=w4a4.")
  for _, _, check, sub in stage_configs(config):
    check(sub)


def run(config, workdir: str) -> dict:
  storage.makedirs(workdir)
  for name, run_stage, _, sub in stage_configs(config):
    print(f"pipeline: {name}")
    run_stage(sub, workdir)
  results = evaluate.run(config, workdir)
  report.write_report(workdir, results, config.schedule)
  return results
