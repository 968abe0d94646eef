"""Post-training quantization baselines: calibrate clips, no fine-tuning.

For every requested (bit widths, protocol, calibration method), the teacher is quantized,
its clips calibrated on generated images (or, as a reference, real training images), and
the result saved as DIR/ptq_w{W}a{A}_{calibration}_{protocol}[_{rules}][_real]. The job
(configs/ptq.py) then evaluates the workdir into DIR/results.json (main.py).
"""
import os
import sys
import time

from dfqf_jax import (calibration, checkpoints, classifiers, image_sources, rng, signals,
                      training, validation)
from dfqf_jax import quant as q


def quantize_and_calibrate(teacher_vars, teacher_meta, spec, method, summaries):
  model, variables = calibration.quantized_student(
      teacher_vars, teacher_meta["depth"], teacher_meta["num_classes"], spec)
  return model, calibration.calibrate(variables, spec, method, summaries)


def models_to_build(config, workdir: str, lineage: dict, methods: list[str]) -> list[tuple]:
  """(spec, method, name, folder) of each requested model the workdir lacks; the ones it
  holds are checked readable (never overwritten), every one against `lineage`."""
  to_build = []
  for spec in validation.quant_specs(config):
    for method in methods:
      name = q.ptq_name(spec, method, config.calibration_data)
      stage_dir = os.path.join(workdir, name)
      checkpoints.check_lineage(stage_dir, name, lineage, config.on_stale_upstream)
      if checkpoints.exists(stage_dir):
        _, meta, _ = checkpoints.load_product(stage_dir, name)
        checkpoints.check_seed(meta, {"seed": config.seed}, stage_dir)
      else:
        to_build.append((spec, method, name, stage_dir))
  return to_build


def run(config, workdir: str) -> None:
  started = time.time()
  _, teacher_vars, teacher_meta = classifiers.load_stage_teacher(config, workdir)
  lineage, generator = {"teacher": teacher_meta[checkpoints.ORIGIN]}, None
  if config.calibration_data == "generated":
    *generator, g_meta = image_sources.load_generator(workdir, config.generator_dir)
    lineage["generator"] = g_meta[checkpoints.ORIGIN]
  methods = validation.split_names(config.calibration)
  to_build = models_to_build(config, workdir, lineage, methods)
  if to_build:
    calibration.announce("ptq", config, methods)
    batches = image_sources.calibration_batches(
        config, teacher_meta, config.calibration_data,
        rng.key(config.seed, rng.CALIBRATION_LATENTS), generator)
    # every bit width, protocol and method (the rules' too): from one reading of the tensors
    methods += [m for spec, method, _, _ in to_build
                for m in calibration.methods_of(spec, method) if m not in methods]
    summaries = calibration.summarize(teacher_vars, teacher_meta["depth"],
                                      teacher_meta["num_classes"], batches, methods)
    # The work the models share (loading, the calibration images, the summaries) is split
    # evenly among them, so that their wall times add up to this invocation's.
    shared_share = (time.time() - started) / len(to_build)
    for i, (spec, method, name, stage_dir) in enumerate(to_build):
      signals.raise_if_stopped()
      print(f"ptq: {name} ({i + 1}/{len(to_build)})", file=sys.stderr, flush=True)
      started = time.time()
      _, variables = quantize_and_calibrate(teacher_vars, teacher_meta, spec, method, summaries)
      meta = classifiers.classifier_meta(
          teacher_meta["depth"], teacher_meta["dataset"], teacher_meta["mean"],
          teacher_meta["std"], spec, model_name=name, weight_bits=spec.weight_bits,
          act_bits=spec.act_bits, protocol=spec.protocol, calibration=method,
          calibration_data=config.calibration_data,
          calibration_images=len(batches) * config.calibration_batch_size,
          total_steps=0, lineage=lineage, seed=config.seed)
      with signals.deferred():  # a model saved is a model whose wall time is counted
        checkpoints.save_once(stage_dir, variables, meta)
        training.add_wall_time(stage_dir, time.time() - started + shared_share)
