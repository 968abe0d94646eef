"""dfqf-jax entry point: python main.py --config=configs/<job>.py[:arg] --workdir=DIR."""
import json
import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dfqf_jax import checkpoints, convert, data, report, training, validation
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


MAX_DEFAULT_CPU_DEVICES = 8


def use_cpu_cores() -> None:
  """Gives XLA one CPU device per core (a power of two, at most 8, so that the usual batch
  sizes divide) unless XLA_FLAGS sets --xla_force_host_platform_device_count.

  XLA:CPU makes a single device by default, which uses several cores poorly; on this
  project's 2-core CPU, 2 devices run the teacher step 1.2x and the stage-1 iteration 1.5x
  faster (docs/results/benchmarks.jsonl). Only the CPU backend is affected.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  cores = min(os.cpu_count() or 1, MAX_DEFAULT_CPU_DEVICES)
  jax.config.update("jax_num_cpu_devices", 1 << (cores.bit_length() - 1))


def initialize_distributed(config) -> None:
  """Multi-process runs: an explicit coordinator, or num_processes=0 (or > 1 without a
  coordinator) to let JAX detect the cluster (Cloud TPU, SLURM, ...); 1 = one process."""
  if config.distributed.coordinator or config.distributed.num_processes != 1:
    # Cross-process collectives for the CPU backend (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if config.distributed.coordinator:
    jax.distributed.initialize(config.distributed.coordinator,
                               config.distributed.num_processes, config.distributed.process_id)
  elif config.distributed.num_processes != 1:
    jax.distributed.initialize()


def main(argv) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  config = FLAGS.config
  if config.stage not in STAGES:
    raise validation.ConfigError(f"config.stage={config.stage!r} is unknown; allowed: "
                                 f"{sorted(STAGES)}.")
  use_cpu_cores()
  initialize_distributed(config)
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
