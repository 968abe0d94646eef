"""Interrupted runs resume exactly: same steps, same data order, bit-identical parameters.

The run that is interrupted is a main.py subprocess; the uninterrupted run and the rerun
are the same command in this test process, which computes exactly what that subprocess
does (cli.environment_of_the_test_process)."""
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cli import REPO, main_command, run_in_process, environment_of_the_test_process
from conftest import SMALL_DATA, SMALL_TEACHER_ARGS, copy_workdir
from dfqf_jax import checkpoints, report
from dfqf_jax.stages import zeroq

# Every stage's teacher is a ResNet-8 (conftest.SMALL_TEACHER_ARGS, in COMMON): what resumes
# does not depend on the depth. The teacher's own stage trains one from scratch.
TEACHER = "configs/teacher.py:smoke"
STAGES = {
    "teacher": (TEACHER, ["--config.num_steps=16", "--config.batch_size=8"]),
    "generator": ("configs/generator.py:smoke", ["--config.num_epochs=4",
                                                 "--config.iters_per_epoch=4",
                                                 "--config.batch_size=8",
                                                 "--config.eval_every_epochs=100"]),
    "student_w4a4": ("configs/finetune.py:w4a4,smoke", ["--config.batch_size=8",
                                                        "--config.steps_per_epoch=4",
                                                        "--config.num_epochs=4",
                                                        "--config.eval_every_epochs=100"]),
    # ZeroQ's distillation: 2 groups of 2 batches, 4 iterations each (the kill falls in the
    # second group); fine-tuning with GDFQ's generator trained alongside.
    "zeroq": ("configs/zeroq.py:smoke", []),
    "student_w4a4_gdfq": ("configs/finetune.py:w4a4,smoke", ["--config.images=gdfq",
                                                             "--config.steps_per_epoch=8",
                                                             "--config.eval_every_epochs=100"]),
}
COMMON = [f"--config.data.dir={SMALL_DATA}", "--config.checkpoint_every_steps=4",
          "--config.log_every_steps=1", *SMALL_TEACHER_ARGS]
KILL_AFTER = 4  # steps: a checkpoint at or after it exists when the signal is sent


def prepare(workdir, stage, teacher_workdir, generator_workdir):
  """What the stage reads: a teacher, and for fine-tuning a (smoke) generator
  (generator_workdir: the one the stage's images come from)."""
  if stage in ("generator", "zeroq"):
    copy_workdir(teacher_workdir, workdir)
  elif stage.startswith("student_"):
    copy_workdir(generator_workdir, workdir)


def final_state(workdir, stage):
  state, _, step = checkpoints.load_product(os.path.join(workdir, stage), stage)
  return state, step


def logged_steps(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if line.strip()]


def start_and_interrupt(workdir, stage, sig, after_step):
  """Starts the stage and sends `sig` once a checkpoint at or after `after_step` exists."""
  config, extra = STAGES[stage]
  process = subprocess.Popen(main_command(config, workdir, *COMMON, *extra), cwd=REPO,
                             env=environment_of_the_test_process(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    step = checkpoints.latest_step(os.path.join(workdir, stage))
    if step is not None and step >= after_step:
      process.send_signal(sig)
      break
    time.sleep(0.02)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


def run_straight_and_interrupted(stage, tmp_path, sig, teacher_workdir=None,
                                 generator_workdir=None):
  """The stage run uninterrupted in tmp_path/straight, and in tmp_path/interrupted sent `sig`
  once a checkpoint at or after KILL_AFTER exists; returns (returncode, stderr, the latest
  checkpoint step) of the interrupted run, whose workdir is then ready for a rerun."""
  config, extra = STAGES[stage]
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  for workdir in (straight, interrupted):
    prepare(workdir, stage, teacher_workdir, generator_workdir)
  result = run_in_process(config, straight, *COMMON, *extra)
  assert result.returncode == 0, result.stderr[-2000:]
  returncode, stderr = start_and_interrupt(interrupted, stage, sig, KILL_AFTER)
  return returncode, stderr, checkpoints.latest_step(os.path.join(interrupted, stage))


def assert_rerun_is_bit_identical_to_straight(stage, tmp_path, interrupted_at):
  """The interrupted run, rerun with the same command, resumes from its checkpoint and ends
  where the uninterrupted one did: every step logged once, bit-identical state."""
  config, extra = STAGES[stage]
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  result = run_in_process(config, interrupted, *COMMON, *extra)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resuming from step {interrupted_at}" in result.stdout
  expected, final_step = final_state(straight, stage)
  got, step = final_state(interrupted, stage)
  assert step == final_step
  _, meta, _ = checkpoints.load_product(os.path.join(interrupted, stage), stage)
  assert meta["seed"] == 0  # recorded: a rerun with another seed is refused
  calibrated_start = [0] if stage.startswith("student_") else []  # the PTQ starting point
  assert logged_steps(interrupted, stage) == calibrated_start + list(range(1, final_step + 1))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stage", ["generator", "student_w4a4"])
def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(
    stage, tmp_path, small_data, small_teacher_workdir, generator_workdir):
  """(The teacher's stage is interrupted by SIGTERM in the next test, with the same check.)"""
  assert_sigkill_then_rerun_is_bit_identical(stage, tmp_path, small_teacher_workdir,
                                             generator_workdir)


def test_zeroqs_distillation_resumes_bit_identically_after_sigkill(tmp_path, small_data,
                                                                  small_teacher_workdir):
  returncode, _, killed_at = run_straight_and_interrupted(
      "zeroq", tmp_path, signal.SIGKILL, small_teacher_workdir)
  assert returncode == -signal.SIGKILL, "the run finished before it could be killed"
  # Fine-tuning does not draw on an unfinished distillation.
  with pytest.raises(checkpoints.CheckpointError,
                     match=rf"stopped at step {killed_at} of \d+; rerun the zeroq stage"):
    zeroq.load_images(str(tmp_path / "interrupted"))
  assert_rerun_is_bit_identical_to_straight("zeroq", tmp_path, killed_at)


def test_fine_tuning_with_gdfqs_generator_alongside_resumes_bit_identically_after_sigkill(
    tmp_path, small_data, gdfq_workdir):
  assert_sigkill_then_rerun_is_bit_identical("student_w4a4_gdfq", tmp_path, None, gdfq_workdir)


def assert_sigkill_then_rerun_is_bit_identical(stage, tmp_path, teacher_workdir,
                                               generator_workdir):
  returncode, _, killed_at = run_straight_and_interrupted(
      stage, tmp_path, signal.SIGKILL, teacher_workdir, generator_workdir)
  assert returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert_rerun_is_bit_identical_to_straight(stage, tmp_path, killed_at)


def test_sigterm_saves_the_current_step_and_the_rerun_is_bit_identical(tmp_path, small_data):
  returncode, stderr, saved = run_straight_and_interrupted("teacher", tmp_path, signal.SIGTERM)
  assert returncode == 143, stderr[-2000:]
  assert "stopped: teacher: stopped by SIGTERM at step" in stderr
  interrupted = tmp_path / "interrupted"
  assert saved == logged_steps(interrupted, "teacher")[-1]
  assert KILL_AFTER <= saved < 16
  record = report.record_run(str(tmp_path / "record.json"), str(interrupted), {}, 1.0)
  assert record["stopped_early_at_step"] == {"teacher": saved}  # a record says it was cut short
  assert_rerun_is_bit_identical_to_straight("teacher", tmp_path, saved)
  record = report.record_run(str(tmp_path / "record.json"), str(interrupted), {}, 1.0)
  assert "stopped_early_at_step" not in record
  assert saved in [step for step, _ in record["curves"]["teacher"]["loss"]]  # its row is kept


def test_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                 small_data):
  args = [*COMMON, "--config.num_steps=16", "--config.learning_rate=1e12"]
  result = run_in_process(TEACHER, tmp_path, *args, "--config.log_every_steps=5")
  assert result.returncode == 2, result.stderr[-2000:]
  error = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and "'loss'" in error[0] and "by step" in error[0], result.stderr[-2000:]
  stage_dir = os.path.join(tmp_path, "teacher")
  saved = checkpoints.latest_step(stage_dir)
  assert saved is None or saved < 16
  if saved is not None:  # the kept checkpoint holds finite parameters
    state, _, _ = checkpoints.load_product(stage_dir, "teacher")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_corrupted_checkpoint_is_reported_and_not_overwritten(tmp_path, small_data):
  result = run_in_process(TEACHER, tmp_path, *COMMON, "--config.num_steps=4")
  assert result.returncode == 0, result.stderr[-2000:]
  step_dir = os.path.join(tmp_path, "teacher", "4", "state")
  data_files = [os.path.join(root, f) for root, _, files in os.walk(step_dir) for f in files
                if os.path.getsize(os.path.join(root, f)) > 1000]
  for path in data_files:  # truncate the array data
    with open(path, "r+b") as f:
      f.truncate(100)
  snapshot = {p: os.path.getsize(p) for p in data_files}
  result = run_in_process(TEACHER, tmp_path, *COMMON, "--config.num_steps=8")
  assert result.returncode == 2, result.stderr[-2000:]
  error = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and "cannot be restored" in error[0] and "delete it" in error[0]
  detail = error[0].split("cannot be restored (", 1)[1].split("); it is", 1)[0]
  assert ": " in detail and detail != "Exception", error  # what Orbax found, not a bare type
  assert {p: os.path.getsize(p) for p in data_files} == snapshot
  assert checkpoints.latest_step(os.path.join(tmp_path, "teacher")) == 4
