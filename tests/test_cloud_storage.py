"""--workdir=gs://... end to end, against a Cloud Storage emulator on 127.0.0.1: the smoke
pipeline killed in stage 1 and resumed there, then evaluated by a second process; what it
wrote is read back through the emulator's own JSON API (not through our path layer), and
its models through dfqf_jax.load; and the pretrained teacher imported into a gs:// workdir."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from cli import REPO, environment, main_command
from conftest import SMALL_DATA, SMALL_TEACHER_ARGS, TEACHER_WEIGHTS

pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed "
                    "(requirements.txt pins it)")
pytest.importorskip("gcsfs", reason="gcsfs is not installed (requirements.txt pins it)")

BUCKET = "dfqf-test"


class Emulator:
  """gcp-storage-emulator (tests/gcs_emulator.py) in a child process, in memory, with one
  bucket."""

  def __init__(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(self.port), BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
      try:
        self.names("")
        return
      except OSError:
        time.sleep(0.1)
    raise RuntimeError("the emulator did not start")

  def environment(self) -> dict:
    """What points gcsfs (epath's gs:// backend) and tensorstore (Orbax) at the emulator,
    with no credential lookup (the settings each library documents for emulators), and keeps
    gcsfs from probing the bucket type over gRPC (which an emulator does not serve)."""
    env = environment(devices=1)
    env.update(STORAGE_EMULATOR_HOST=self.url, FSSPEC_GCS_TOKEN="anon",
               TENSORSTORE_GCS_HTTP_URL=self.url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return env

  def names(self, prefix: str) -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o?{query}", timeout=5) as r:
      return [item["name"] for item in json.load(r).get("items", [])]

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media",
                                timeout=5) as r:
      return r.read()

  def stop(self) -> None:
    self.process.terminate()
    self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def emulator():
  server = Emulator()
  yield server
  server.stop()


def pipeline_args(workdir: str) -> list[str]:
  """The smoke pipeline with its own teacher, a ResNet-8 trained from scratch (4 steps): what
  goes to and comes from the bucket does not depend on what the teacher knows."""
  return ["configs/pipeline.py:smoke", workdir, f"--config.data.dir={SMALL_DATA}",
          *SMALL_TEACHER_ARGS, "--config.ptq_stage.calibration=ft",
          "--config.ptq_stage.protocol=dfqf"]


def test_a_gs_workdir_is_written_resumed_and_read_back(emulator, small_data, tmp_path):
  workdir = f"gs://{BUCKET}/run"
  env = emulator.environment()
  # 1. The pipeline, killed (SIGKILL: no chance to clean up) once stage 1 saved a checkpoint.
  first = subprocess.Popen(main_command(*pipeline_args(workdir)), cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while not any(re.fullmatch(r"run/generator/\d+/commit_success.txt", n)  # Orbax's mark
                for n in emulator.names("run/generator/")):
    assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert "run/.dfqf.lock" in emulator.names("run/")  # left behind by the killed run
  assert not any("/student_" in n for n in emulator.names("run/"))

  # 2. The same command resumes stage 1 from its checkpoint and finishes the pipeline.
  second = subprocess.run(main_command(*pipeline_args(workdir)), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"took over the stale lock of pid {first.pid}" in second.stderr
  resumed = re.search(r"generator: finished at step 4 in gs://\S+ \((\d+) steps this run",
                      second.stdout)
  assert resumed and int(resumed.group(1)) < 4, second.stdout[-3000:]  # not from scratch
  rows = [json.loads(line) for line in
          emulator.read("run/generator/metrics.jsonl").decode().splitlines()]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)) and steps[-1] == 4  # every step logged exactly once
  assert "run/.dfqf.lock" not in emulator.names("run/")
  names = emulator.names("run/")
  for expected in ("run/report.md", "run/generator/grid.png", "run/curves_student_w4a4.png",
                   "run/generator/wall_seconds.json"):
    assert expected in names, expected
  assert any(n.startswith("run/generator/tensorboard/events.out.tfevents") for n in names)
  assert not any(os.path.exists(os.path.join(REPO, p)) for p in ("gs:", "gs:/"))

  # 3. results.json read back through the emulator: every model scored, each checkpoint
  # named relative to the workdir.
  written = json.loads(emulator.read("run/results.json"))
  for name in ("teacher", "generator_student_fp", "student_w4a4", "ptq_w4a4_ft_dfqf"):
    assert not written[name]["checkpoint"].startswith(("/", "gs:")), name  # in the workdir
    assert 0 <= written[name]["top1_percent"] <= 100, name

  # 4. Another process: dfqf_jax.load reads models back from the gs:// workdir and scores
  # them as results.json does.
  names = ("teacher", "student_w4a4")
  read_back = subprocess.run(
      [sys.executable, "-c", "import sys, dfqf_jax; print(*(dfqf_jax.load(sys.argv[1], n)"
       ".top1_percent(sys.argv[2]) for n in sys.argv[3:]))", workdir, SMALL_DATA, *names],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert read_back.returncode == 0, read_back.stderr[-3000:]
  assert [float(x) for x in read_back.stdout.split()] == [written[n]["top1_percent"]
                                                          for n in names]
  # 5. The pretrained teacher imported into a gs:// workdir (the pipeline above trained its
  # own). (Imported again, it is kept: tests/test_validation.py; the rerun above read this
  # bucket's checkpoints back.)
  imported = subprocess.run(
      main_command("configs/import_teacher.py", f"gs://{BUCKET}/imported",
                   f"--config.weights={TEACHER_WEIGHTS}"),
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert imported.returncode == 0, imported.stderr[-3000:]
  assert any(re.fullmatch(r"imported/teacher/\d+/commit_success.txt", n)
             for n in emulator.names("imported/teacher/"))


def test_a_bucket_that_does_not_exist_is_one_error(emulator, tmp_path):
  result = subprocess.run(
      main_command("configs/import_teacher.py", "gs://no-such-bucket/run",
                   f"--config.weights={TEACHER_WEIGHTS}"),
      cwd=REPO, env=emulator.environment(), capture_output=True, text=True, timeout=300)
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(error_lines) == 1, result.stderr[-2000:]
  assert "no-such-bucket" in error_lines[0] and "exists" in error_lines[0]
