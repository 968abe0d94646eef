"""One run per workdir: a lock taken before any write, naming its holder; stale locks (a
killed run, a vanished host) are taken over."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from cli import main_command, run_in_process, environment_of_the_test_process
from conftest import REPO, SMALL_TEACHER_ARGS, copy_workdir

from dfqf_jax import checkpoints, workdir

GENERATOR = "configs/generator.py:smoke"


def write_lock(folder, **holder):
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / workdir.LOCK_FILE
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": "earlier", "command": "main.py ...", **holder}))
  return path


def dead_pid() -> int:
  process = subprocess.Popen(["true"])
  process.wait()
  return process.pid


def test_the_lock_is_exclusive_and_released(tmp_path):
  with workdir.Lock(str(tmp_path)):
    holder = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(workdir.WorkdirError, match=f"in use by pid {os.getpid()}"):
      workdir.Lock(str(tmp_path)).__enter__()
  assert not (tmp_path / workdir.LOCK_FILE).exists()


@pytest.mark.parametrize("holder,age_seconds,stale", [
    ({"pid": "dead"}, 0, True),  # this host, process gone (SIGKILL, OOM)
    ({}, 0, False),  # this host, running (this very process)
    ({"host": "preempted-vm", "pid": 1}, 2 * workdir.STALE_AFTER_SECONDS, True),
    ({"host": "other-host", "pid": 1}, 5, False),  # another host, heartbeat fresh
])
def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, holder, age_seconds, stale):
  if holder.get("pid") == "dead":
    holder = {"pid": dead_pid()}
  path = write_lock(tmp_path, **holder)
  old = time.time() - age_seconds
  os.utime(path, (old, old))
  if stale:
    with workdir.Lock(str(tmp_path)):
      assert json.loads(path.read_text())["pid"] == os.getpid()
  else:
    with pytest.raises(workdir.WorkdirError, match="delete .*dfqf.lock"):
      workdir.Lock(str(tmp_path)).__enter__()
    assert json.loads(path.read_text())["pid"] == holder.get("pid", os.getpid())


@pytest.fixture
def teacher_workdir(small_teacher_workdir, tmp_path):
  """A workdir with a teacher (a ResNet-8: stage runs in it pass SMALL_TEACHER_ARGS)."""
  return copy_workdir(small_teacher_workdir, tmp_path / "run")


def start(workdir_path, *args):
  return subprocess.Popen(main_command(GENERATOR, workdir_path, *args), cwd=REPO,
                          env=environment_of_the_test_process(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for_lock(path, process):
  while not (path / workdir.LOCK_FILE).exists():
    assert process.poll() is None, process.communicate()[1][-2000:]
    time.sleep(0.1)


def test_a_second_run_in_a_busy_workdir_is_refused_and_the_first_finishes(teacher_workdir,
                                                                         small_data):
  args = (f"--config.data.dir={small_data}", "--config.num_epochs=3", *SMALL_TEACHER_ARGS)
  first = start(teacher_workdir, *args)
  wait_for_lock(teacher_workdir, first)
  second = run_in_process(GENERATOR, teacher_workdir, *args)
  assert second.returncode == 2
  error = [l for l in second.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and f"in use by pid {first.pid}" in error[0], second.stderr[-2000:]
  _, stderr = first.communicate(timeout=900)
  assert first.returncode == 0, stderr[-2000:]
  assert checkpoints.latest_step(str(teacher_workdir / "generator")) == 6
  assert not (teacher_workdir / workdir.LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(teacher_workdir, small_data):
  args = (f"--config.data.dir={small_data}", *SMALL_TEACHER_ARGS)
  killed = start(teacher_workdir, *args)
  wait_for_lock(teacher_workdir, killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert (teacher_workdir / workdir.LOCK_FILE).exists()
  rerun = run_in_process(GENERATOR, teacher_workdir, *args)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"took over the stale lock of pid {killed.pid}" in rerun.stderr
  assert checkpoints.latest_step(str(teacher_workdir / "generator")) == 4
