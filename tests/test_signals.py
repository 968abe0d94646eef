"""SIGTERM and SIGINT in every kind of stage: one `stopped:` line naming what stopped, exit
143 (SIGTERM) or 130 (SIGINT, Ctrl-C), the workdir's lock released, nothing half-written;
rerunning the same command finishes the job. (The training loop's stop, which saves its
step first, is tested on a real process in test_resume.py and test_lineage.py.)

Each test runs main.py's command line in this process (cli.run_in_process) and sends the
signal to itself from inside the stage, at a chosen point, as a scheduler's `kill` would."""
import os
import signal
import subprocess
import sys

import pytest

from cli import run_in_process
from configs import ptq as ptq_config
from conftest import (REPO, SMALL_TEACHER_ARGS, SMALL_TEACHER_DEPTH, TEACHER_WEIGHTS,
                      copy_workdir)
from dfqf_jax import (calibration, checkpoints, classifiers, convert, integer, signals, training,
                      workdir)
from dfqf_jax.stages import ptq

PTQ = "configs/ptq.py:w4a4,smoke"  # 32 calibration images


def signal_self_on_call(monkeypatch, module, name: str, signum: int, call: int = 1):
  """module.name sends `signum` to this process on its `call`-th call, then does its work
  (the signal is handled as soon as the call returns to Python)."""
  original, calls = getattr(module, name), []

  def wrapped(*args, **kwargs):
    calls.append(1)
    if len(calls) == call:
      os.kill(os.getpid(), signum)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapped)


def assert_stopped(result, workdir_path, name: str, signum: int):
  assert result.returncode == 128 + signum, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("stopped: ")]
  assert lines == [f"stopped: {name}: stopped by {signal.Signals(signum).name} before it "
                   "finished; what it completed is saved. Rerun the same command to continue."]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(workdir_path, workdir.LOCK_FILE))


def test_ctrl_c_during_evaluation_writes_no_results(imported_workdir, tmp_path, monkeypatch,
                                                    small_data):
  run = copy_workdir(imported_workdir, tmp_path / "run")
  signal_self_on_call(monkeypatch, classifiers, "top1_percent", signal.SIGINT)
  result = run_in_process("configs/evaluate.py", run, f"--config.data.dir={small_data}")
  assert_stopped(result, run, "evaluate", signal.SIGINT)
  assert not (run / "results.json").exists()
  monkeypatch.undo()
  assert run_in_process("configs/evaluate.py", run, f"--config.data.dir={small_data}"
                        ).returncode == 0


def test_sigterm_during_calibration_builds_no_ptq_model(generator_workdir, tmp_path,
                                                        monkeypatch, small_data):
  run = copy_workdir(generator_workdir, tmp_path / "run")
  signal_self_on_call(monkeypatch, calibration, "summarize", signal.SIGTERM)
  result = run_in_process(PTQ, run, *SMALL_TEACHER_ARGS, f"--config.data.dir={small_data}")
  assert_stopped(result, run, "ptq", signal.SIGTERM)
  assert not [d for d in os.listdir(run) if d.startswith("ptq_")]


def test_sigterm_while_a_ptq_model_is_saved_stops_after_it_is_whole(generator_workdir, tmp_path,
                                                                     monkeypatch, small_data):
  """The signal arrives while the first model is saved: that model is finished (checkpoint
  and wall time) and no other is started (the rerun builds only the rest: the soak in
  experiments/fault_soak/ reruns after every stop)."""
  run = copy_workdir(generator_workdir, tmp_path / "run")
  signal_self_on_call(monkeypatch, checkpoints, "save", signal.SIGTERM)
  result = run_in_process(PTQ, run, *SMALL_TEACHER_ARGS, f"--config.data.dir={small_data}",
                          "--config.calibration=max", "--config.protocol=dfqf,standard")
  assert_stopped(result, run, "ptq", signal.SIGTERM)
  built = [d for d in os.listdir(run) if d.startswith("ptq_")]
  assert len(built) == 1 and checkpoints.latest_step(run / built[0]) == 0
  assert training.read_wall_time(run / built[0]) is not None


@pytest.mark.parametrize("config", ["configs/import_teacher.py", "configs/pipeline.py:smoke"])
def test_sigterm_during_the_teacher_import_writes_nothing(tmp_path, monkeypatch, small_data,
                                                          config):
  """Alone and as the pipeline's first stage (whose `stopped:` line names that stage)."""
  signal_self_on_call(monkeypatch, convert, "torch_resnet_to_flax", signal.SIGTERM)
  overrides = ([f"--config.weights={TEACHER_WEIGHTS}"] if "import" in config else
               [f"--config.teacher_weights={TEACHER_WEIGHTS}", f"--config.data.dir={small_data}"])
  result = run_in_process(config, tmp_path / "run", *overrides)
  assert_stopped(result, tmp_path / "run", "import_teacher" if "import" in config else "teacher",
                 signal.SIGTERM)
  assert not any(files for _, _, files in os.walk(tmp_path / "run"))


def test_sigterm_during_an_export_leaves_no_export(tmp_path, monkeypatch, generator_workdir,
                                                   small_data):
  run = copy_workdir(generator_workdir, tmp_path / "run")
  config = ptq_config.get_config("w4a4,smoke")
  config.data.dir, config.calibration, config.protocol = small_data, "max", "dfqf"
  config.model.depth = SMALL_TEACHER_DEPTH
  ptq.run(config, str(run))
  signal_self_on_call(monkeypatch, integer, "save", signal.SIGTERM)
  result = run_in_process("configs/export.py", run, "--config.student=ptq_w4a4_max_dfqf",
                          f"--config.data.dir={small_data}")
  assert_stopped(result, run, "export", signal.SIGTERM)
  assert not (run / "export").exists() or not os.listdir(run / "export")


def test_a_signal_while_the_process_exits_is_ignored_and_one_in_the_job_stops_it():
  """main.py's process ignores SIGTERM outside the job (e.g. during the interpreter's exit
  after the report), and the job inside stop_on_signal still stops with its line and code."""
  program = """
import atexit, os, signal, sys
from dfqf_jax import signals
signals.ignore_outside_jobs()
atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # while the process exits
os.kill(os.getpid(), signal.SIGTERM)  # before the job: nothing to stop
try:
  with signals.stop_on_signal("job"):
    os.kill(os.getpid(), signal.SIGTERM)
    sys.exit("not stopped")
except signals.StoppedBySignal as stop:
  print(stop.exit_code, stop)
"""
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("143 job: stopped by SIGTERM before it finished")


def test_a_stop_lost_in_a_callback_still_stops_the_job():
  """A signal handled inside a weakref callback (as inside a garbage-collection callback or
  JAX's compilation-cache read) raises where Python only prints the exception; the job
  stops anyway, at its next unit of work (signals.raise_if_stopped) or at its end."""
  program = """
import os, signal, weakref
from dfqf_jax import signals
class Buffer: pass
def callback(_):  # the handler runs, and raises, inside the callback
  os.kill(os.getpid(), signal.SIGTERM)
  sum(range(10000))
buffer = Buffer()
reference = weakref.ref(buffer, callback)
try:
  with signals.stop_on_signal("job"):
    del buffer
    print("lost in the callback")
    signals.raise_if_stopped()
    print("not stopped")
except signals.StoppedBySignal as stop:
  print(stop.exit_code)
"""
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["lost", "in", "the", "callback", "143"], result.stdout
  assert "StoppedBySignal" in result.stderr  # what Python printed from the callback


def test_a_stop_during_a_checkpoint_read_is_a_stop_not_a_damaged_checkpoint(
    generator_workdir, tmp_path, monkeypatch, small_data):
  """Reading a checkpoint turns any failure into 'cannot be read ... delete it'; a SIGTERM
  arriving inside that read stops the job (exit 143) and blames no checkpoint."""
  run = copy_workdir(generator_workdir, tmp_path / "run")

  def restore_then_stop(*args, **kwargs):
    raise signals.stop("ptq", signal.SIGTERM)  # as the handler raises it inside Orbax

  monkeypatch.setattr(checkpoints.ocp.PyTreeCheckpointer, "restore", restore_then_stop)
  result = run_in_process(PTQ, run, *SMALL_TEACHER_ARGS, f"--config.data.dir={small_data}")
  assert_stopped(result, run, "ptq", signal.SIGTERM)
  assert "cannot be read" not in result.stderr
