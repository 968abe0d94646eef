"""The whole DFQF pipeline: teacher -> generator -> calibration + fine-tuning -> PTQ
baselines -> evaluation -> report.

Every stage resumes from its own checkpoints, so a finished stage costs nothing when the
pipeline is rerun, and an interrupted one continues where it stopped. Each stage folder
keeps its wall time summed over invocations (wall_seconds.json) for the report.
"""
import copy
import functools

import ml_collections

from dfqf_jax import quant as q
from dfqf_jax import report, signals, storage, validation
from dfqf_jax.config_fields import ADVERSARIAL_FIELDS, PIPELINE_FIELDS, split_path
from dfqf_jax.stages import (evaluate, finetune, gdfq, generator, import_teacher, ptq, teacher,
                             zeroq)

# Fine-tuning's image sources other than stage 1's generator (config.images): each one's
# ImageSource, from its own stage's product.
IMAGE_SOURCES = {"zeroq": zeroq.finetune_source, "gdfq": gdfq.finetune_source}


def _union(names: str, more: list[str]) -> str:
  """Comma-separated `names` with those of `more` it lacks appended, in order."""
  kept = validation.split_names(names)
  return ",".join(kept + [m for m in dict.fromkeys(more) if m not in kept])


def stage_configs(config) -> list:
  """(name, run, validate, config) for each stage, with the pipeline's shared settings."""
  def with_shared(sub):
    sub = copy.deepcopy(sub)
    sub.unlock()
    for field in PIPELINE_FIELDS:
      parents, leaf = split_path(field)
      node, source = sub, config
      for parent in parents:
        if parent not in node:
          node[parent] = ml_collections.ConfigDict()
        node, source = node[parent], source[parent]
      node[leaf] = source[leaf]
    sub.on_stale_upstream = "rebuild"
    return sub

  stages = []
  if config.teacher_weights:
    sub = with_shared(config.import_stage)
    sub.weights = config.teacher_weights
    stages.append(("teacher", import_teacher.run, validation.import_teacher, sub))
  else:
    stages.append(("teacher", teacher.run, validation.teacher, with_shared(config.teacher_stage)))
  if config.images == "zeroq":
    stages.append(("zeroq", zeroq.run, validation.zeroq, with_shared(config.zeroq_stage)))
  elif config.images == "gdfq":
    stages.append(("gdfq", gdfq.run, validation.gdfq, with_shared(config.gdfq_stage)))
  else:
    stages.append(("generator", generator.run, validation.generator,
                   with_shared(config.generator_stage)))
  students = [(q.bits_name(w, a), protocol) for w, a in validation.bit_pairs(config)
              for protocol in validation.split_names(config.finetune_stage.protocol)]
  for bits, protocol in students:
    sub = with_shared(config.finetune_stage)
    sub.bits, sub.protocol, sub.images = bits, protocol, config.images
    for field, source in ADVERSARIAL_FIELDS.items():
      sub[field] = validation.field_value(config.generator_stage, source)
    sub.rules = config.rules
    spec = q.QuantSpec(protocol=protocol, layer_rules=config.rules)
    name = f"finetune_{bits}{spec.name_suffix()}"
    stages.append((name + ("" if config.images == "dfqf" else f"_{config.images}"),
                   functools.partial(finetune.run, sources=IMAGE_SOURCES), validation.finetune,
                   sub))
  if config.images == "dfqf":  # (the PTQ table calibrates on stage 1's images)
    sub = with_shared(config.ptq_stage)  # always holds each student's starting point
    sub.bits = _union(",".join(q.bits_name(w, a) for w, a in validation.bit_pairs(sub)),
                      [bits for bits, _ in students])
    sub.protocol = _union(sub.protocol, [protocol for _, protocol in students])
    sub.rules = config.rules
    stages.append(("ptq", ptq.run, validation.ptq, sub))
  return stages


def describe(name: str, sub) -> str:
  """What stage `name` of the pipeline runs, for its header line."""
  if name == "teacher":
    return f"import {sub.weights}" if "weights" in sub else (
        f"train a ResNet-{sub.model.depth} on {sub.data.name}")
  if name == "generator":
    return (f"stage 1, the generator and a full-precision student "
            f"({sub.num_epochs * sub.iters_per_epoch} steps)")
  if name == "zeroq":
    return (f"ZeroQ's distilled images, {sub.num_batches * sub.batch_size} images "
            f"({zeroq.total_steps_of(sub)} steps)")
  if name == "gdfq":
    return f"GDFQ's conditional generator, warm-up ({sub.warmup_steps} steps)"
  if name == "ptq":
    return (f"PTQ baselines, {sub.bits} x calibration {sub.calibration} x protocol "
            f"{sub.protocol} on {sub.calibration_data} images")
  return (f"calibrate ({sub.calibration}) and fine-tune the {sub.bits} student on "
          f"{sub.get('images', 'dfqf')} images, protocol "
          f"{sub.protocol} ({sub.num_epochs * sub.steps_per_epoch} steps)")


def validate(config) -> None:
  validation.pipeline(config, lambda: [(check, sub) for _, _, check, sub in stage_configs(config)])


def run(config, workdir: str) -> dict:
  storage.makedirs(workdir)
  for name, run_stage, _, sub in stage_configs(config):
    print(f"pipeline: {name}: {describe(name, sub)}", flush=True)
    with signals.stop_on_signal(name):
      run_stage(sub, workdir)
  print("pipeline: evaluate (every model of the workdir on the test split)", flush=True)
  with signals.stop_on_signal("evaluate"):
    results = evaluate.run(config, workdir)
  print("pipeline: report (report.md, its table and curves)", flush=True)
  with signals.stop_on_signal("report"):
    report.write_report(workdir, results, config.schedule)
  return results
