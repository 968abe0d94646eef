"""dfqf-jax entry point: python main.py --config=configs/<job>.py[:arg] --workdir=DIR."""
import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dfqf_jax import checkpoints, convert, data, parallel, report, training, validation
from dfqf_jax.stages import (evaluate, finetune, generator, import_teacher, pipeline, ptq,
                             teacher)

STAGES = {
    "teacher": (teacher.run, validation.teacher),
    "import_teacher": (import_teacher.run, validation.import_teacher),
    "generator": (generator.run, validation.generator),
    "ptq": (ptq.run, validation.ptq),
    "finetune": (finetune.run, validation.finetune),
    "evaluate": (evaluate.run, validation.evaluate),
    "pipeline": (pipeline.run, pipeline.validate),
}
USER_ERRORS = (validation.ConfigError, data.DataError, checkpoints.CheckpointError,
               convert.ConversionError, training.NonFiniteLossError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Job config file (configs/<job>.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for this run's checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def is_multi_process(config) -> bool:
  """An explicit coordinator, or num_processes=0 (detect the cluster: Cloud TPU, SLURM, ...)
  or > 1; num_processes=1 without a coordinator is a single-process run."""
  return bool(config.distributed.coordinator) or config.distributed.num_processes != 1


def initialize_distributed(config) -> None:
  # Cross-process collectives for the CPU backend (no effect on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if config.distributed.coordinator:
    jax.distributed.initialize(config.distributed.coordinator,
                               config.distributed.num_processes, config.distributed.process_id)
  else:
    jax.distributed.initialize()


def main(argv) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  config = FLAGS.config
  if config.stage not in STAGES:
    raise validation.ConfigError(f"config.stage={config.stage!r} is unknown; allowed: "
                                 f"{sorted(STAGES)}.")
  if is_multi_process(config):
    initialize_distributed(config)
  else:
    parallel.use_cpu_cores()
  run, validate = STAGES[config.stage]
  validate(config)
  started = time.time()
  run(config, FLAGS.workdir)
  if config.record_to:
    results = (evaluate.run(config, FLAGS.workdir) if config.stage != "pipeline" else
               json.load(open(os.path.join(FLAGS.workdir, evaluate.RESULTS_FILE))))
    report.record_run(config.record_to, FLAGS.workdir, results, time.time() - started)
    logging.info("run record written to %s", config.record_to)


def _main(argv) -> None:
  try:
    main(argv)
  except USER_ERRORS as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_main)
