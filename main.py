"""dfqf-jax entry point: python main.py --config=configs/<job>.py[:arg] --workdir=DIR."""
import contextlib
import functools
import json
import os
import re
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from dfqf_jax import parallel, report, signals, storage, validation, workdir
from dfqf_jax.errors import UserError
from dfqf_jax.stages import (evaluate, export, finetune, gdfq, generator, import_teacher,
                             pipeline, ptq, teacher, zeroq)


def ptq_and_evaluate(config, workdir_path: str) -> dict:
  """The PTQ job: its models, then the workdir's evaluation (results.json and the table)."""
  ptq.run(config, workdir_path)
  return evaluate.run(config, workdir_path)


STAGES = {
    "teacher": (teacher.run, validation.teacher),
    "import_teacher": (import_teacher.run, validation.import_teacher),
    "generator": (generator.run, validation.generator),
    "zeroq": (zeroq.run, validation.zeroq),
    "gdfq": (gdfq.run, validation.gdfq),
    "ptq": (ptq_and_evaluate, validation.ptq),
    "finetune": (functools.partial(finetune.run, sources=pipeline.IMAGE_SOURCES),
                 validation.finetune),
    "evaluate": (evaluate.run, validation.evaluate),
    "pipeline": (pipeline.run, pipeline.validate),
    "export": (export.run, validation.export),
}

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS, argv: list[str] | None = None) -> None:
  """--config and --workdir in `flag_values`; the --config.* overrides are those that `argv`
  (default: sys.argv) can set, as ml_collections defines them from the command line."""
  config_flags.DEFINE_config_file("config", None, "Job config file (configs/<job>.py[:arg]).",
                                  lock_config=True, flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Folder for this run's checkpoints, logs and results.",
                      flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags()


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


@contextlib.contextmanager
def workdir_held(path: str):
  """Holds the workdir's lock for the job (process 0 takes it; the others learn whether it
  could)."""
  lock = workdir.Lock(path) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.__enter__()
    except workdir.WorkdirError as e:
      error = e
  if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(
      np.int32(error is None)) and error is None:
    error = workdir.WorkdirError("process 0 could not take the workdir's lock (see its error).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.__exit__(None, None, None)


def record(config, workdir_path: str, started: float) -> None:
  results = (evaluate.run(config, workdir_path) if config.stage != "pipeline" else
             json.loads(storage.read_text(os.path.join(workdir_path, evaluate.RESULTS_FILE))))
  report.record_run(config.record_to, workdir_path, results, time.time() - started)
  print(f"run record written to {config.record_to}")


def main(config, workdir_path: str) -> None:
  """Runs the job `config` in `workdir_path`: checks, then the stage under the workdir's
  lock. User errors raise errors.UserError; a stop by signal exits with its code."""
  if config.stage not in STAGES:
    raise validation.ConfigError(f"config.stage={config.stage!r} is unknown; allowed: "
                                 f"{sorted(STAGES)}.")
  workdir.check(workdir_path)
  if config.stage == "evaluate":
    evaluate.check_workdir(workdir_path)  # evaluation reads a workdir; it never makes one
  if is_multi_process(config):
    initialize_distributed(config)
  else:
    parallel.use_cpu_cores()
  run, validate = STAGES[config.stage]
  validate(config)
  started = time.time()
  with workdir_held(workdir_path):
    try:
      run(config, workdir_path)
    except signals.StoppedBySignal as stop:
      if config.record_to and config.stage != "pipeline" and stop.step is not None:
        record(config, workdir_path, started)  # the record says where the stage stopped
      raise
    if config.record_to:
      record(config, workdir_path, started)


def unknown_field_message(error: str, overrides: list[str]) -> str:
  """'--config.a.lerning_rate=1: the config has no field 'lerning_rate' (did you mean
  'learning_rate'?)...' from ml_collections' (escaped, quoted) message about a missing field."""
  words = re.findall(r"[A-Za-z_]\w*", error)
  paths = {a: a.split("=")[0].removeprefix("--config.").split(".") for a in overrides}
  culprit = next((a for a in overrides if words and words[0] in paths[a]), None)
  field = words[0] if words else error
  suggestion = re.search(r'Did you mean "(\w+)"', error)
  return (f"{culprit or ' '.join(overrides)}: the config has no field {field!r}"
          + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else "")
          + "; see the config file for the field names.")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's flag parsing, with a bad config file argument or an unknown --config.* field
  reported as one `error:` line."""
  try:
    return flag_values(argv)
  except Exception as e:  # config_flags raises whatever the config file or ConfigDict raise
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    cause = e.__cause__ or e
    if isinstance(cause, (AttributeError, KeyError)):
      message = unknown_field_message(str(cause), overrides)
    else:
      message = str(cause).strip().splitlines()[-1].removeprefix("ValueError: ")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(config, workdir_path: str) -> None:
  """`main`, with a user error printed as one `error:` line and exit code 2, and a stop by
  SIGTERM/SIGINT anywhere as one `stopped:` line and exit code 143/130 (signals.py)."""
  try:
    with signals.stop_on_signal(config.stage):
      main(config, workdir_path)
  except UserError as e:
    print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
    sys.exit(2)
  except signals.StoppedBySignal as stop:
    print(f"stopped: {stop}", file=sys.stderr)
    sys.exit(stop.exit_code)


def _main(argv) -> None:
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO.
  signals.ignore_outside_jobs()  # a signal during the process's exit: the job is over
  try:
    run(FLAGS.config, FLAGS.workdir)
  except SystemExit as stopped_or_failed:  # its line printed, the workdir's lock released
    # No interpreter teardown: JAX's and Orbax's threads, cut off mid-work by the stop or
    # the error, can crash it (measured: exit 139 after the `stopped:` line in 5 of 10 runs
    # stopped in PTQ or evaluation without a compilation cache).
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if not isinstance(stopped_or_failed.code, int):
      raise
    os._exit(stopped_or_failed.code)


if __name__ == "__main__":
  app.run(_main, flags_parser=parse_flags)
