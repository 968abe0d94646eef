"""Interrupted runs resume exactly: same steps, same data order, bit-identical parameters."""
import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cli import REPO, environment, main_command, run_main
from conftest import SHARED_DATA, TEACHER_WEIGHTS
from dfqf_jax import checkpoints

STAGES = {
    "teacher": ("configs/teacher.py:smoke", ["--config.num_steps=40"]),
    "generator": ("configs/generator.py:smoke", ["--config.num_epochs=10",
                                                 "--config.iters_per_epoch=4",
                                                 "--config.eval_every_epochs=100"]),
}
COMMON = [f"--config.data.dir={SHARED_DATA}", "--config.checkpoint_every_steps=10",
          "--config.log_every_steps=1"]


def prepare(workdir, stage):
  if stage != "teacher":
    result = run_main("configs/import_teacher.py", workdir, f"--config.weights={TEACHER_WEIGHTS}")
    assert result.returncode == 0, result.stderr[-2000:]


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
                             env=environment(), stdout=subprocess.PIPE,
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


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(stage, tmp_path,
                                                                      shared_data):
  config, extra = STAGES[stage]
  straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
  for workdir in (straight, interrupted):
    prepare(workdir, stage)
  result = run_main(config, straight, *COMMON, *extra)
  assert result.returncode == 0, result.stderr[-2000:]

  returncode, _ = start_and_interrupt(interrupted, stage, signal.SIGKILL, after_step=10)
  assert returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = checkpoints.latest_step(os.path.join(interrupted, stage))
  result = run_main(config, interrupted, *COMMON, *extra)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"resuming from step {killed_at}" in result.stdout

  expected, final_step = final_state(straight, stage)
  got, step = final_state(interrupted, stage)
  assert step == final_step
  assert logged_steps(interrupted, stage) == list(range(1, final_step + 1))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step(tmp_path, shared_data):
  returncode, stderr = start_and_interrupt(tmp_path, "teacher", signal.SIGTERM, after_step=10)
  assert returncode == 0, stderr[-2000:]
  saved = checkpoints.latest_step(os.path.join(tmp_path, "teacher"))
  assert saved == logged_steps(tmp_path, "teacher")[-1]
  assert 10 <= saved < 40
