"""No silently wrong result: a signal stops the whole pipeline, and every model records the
exact upstream checkpoints it was built from; a rerun rebuilds what no longer matches."""
import json
import os
import shutil
import signal
import subprocess
import time
import types

import jax
import pytest

from cli import environment, main_command, run_in_process, run_main
from conftest import REPO, TEACHER_WEIGHTS, prepared_once

from dfqf_jax import checkpoints

DOWNSTREAM_PREFIXES = ("student_", "ptq_")
# One worker runs these tests: they share one prepared pipeline, which another worker would
# wait for, idle. Its runs are main.py subprocesses on one device: the rerun reuses what the
# stopped run compiled (the compilation cache), and a smoke pipeline costs less there than
# on this process's 8 devices. A refusal compiles nothing: it runs in this process.
pytestmark = pytest.mark.xdist_group("lineage")


def pipeline_args(data_dir, generator_epochs: int = 6) -> tuple[str, ...]:
  """The smoke pipeline on the imported teacher, its generator 2 x `generator_epochs` steps
  (long enough to be stopped in)."""
  return (f"--config.data.dir={data_dir}", f"--config.teacher_weights={TEACHER_WEIGHTS}",
          f"--config.generator_stage.num_epochs={generator_epochs}")


def generator_origin(workdir) -> dict:
  return checkpoints.load_product(os.path.join(workdir, "generator"), "generator")[1][
      checkpoints.ORIGIN]


def downstream(results: dict) -> dict:
  return {n: r for n, r in results.items() if n.startswith(DOWNSTREAM_PREFIXES)}


def wait_for(predicate, process, timeout=600.0):
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if predicate():
      return True
    time.sleep(0.2)
  return False


@pytest.fixture(scope="session")
def pipeline_stopped_then_finished(tmp_path_factory, small_data):
  """The smoke pipeline with a 12-step generator, SIGTERM once the generator has saved a
  step, then the same command again; made once per session (shared by xdist workers, so
  never write into it: copy it)."""
  args = pipeline_args(small_data)

  def build(workdir):
    workdir.mkdir(parents=True)
    process = subprocess.Popen(main_command("configs/pipeline.py:smoke", workdir, *args),
                               cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: checkpoints.latest_step(str(workdir / "generator")), process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    stopped = dict(returncode=process.returncode, stderr=stderr,
                   folders=sorted(os.listdir(workdir)),
                   stopped_at=checkpoints.latest_step(str(workdir / "generator")))
    rerun = run_main("configs/pipeline.py:smoke", workdir, *args,
                     f"--config.record_to={workdir / 'record.json'}")
    outcome = {"stopped": stopped, "rerun": {"returncode": rerun.returncode,
                                             "stdout": rerun.stdout, "stderr": rerun.stderr}}
    (workdir.parent / "outcome.json").write_text(json.dumps(outcome))

  workdir = prepared_once(tmp_path_factory, "lineage", build)
  outcome = json.loads((workdir.parent / "outcome.json").read_text())
  return workdir, outcome["stopped"], types.SimpleNamespace(**outcome["rerun"])


def test_a_signal_in_stage_1_stops_the_pipeline_and_the_rerun_builds_on_the_final_generator(
    pipeline_stopped_then_finished):
  workdir, stopped, rerun = pipeline_stopped_then_finished
  assert stopped["returncode"] == 143, stopped["stderr"][-2000:]
  assert "stopped: generator: stopped by SIGTERM" in stopped["stderr"]
  assert stopped["stopped_at"] < 12
  assert not [f for f in stopped["folders"] if f.startswith(DOWNSTREAM_PREFIXES)]

  assert rerun.returncode == 0, rerun.stderr[-3000:]
  final = generator_origin(workdir)
  assert final["step"] == 12 and final["finished"]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert set(downstream(results)) >= {"student_w4a4", "ptq_w4a4_ft_dfqf", "ptq_w4a4_max_standard"}
  for name, entry in downstream(results).items():
    assert entry["lineage"]["generator"] == final, name
    assert entry["finished"], name


def test_the_finished_pipeline_scores_every_stage_and_reports(pipeline_stopped_then_finished):
  """The smoke pipeline end to end (its first run the README's command in a subprocess):
  every stage, report, complete results.json and run record."""
  workdir, _, rerun = pipeline_stopped_then_finished
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  # The imported teacher with its own normalization (its exact 91.73% on the full test split:
  # tests/test_models.py); here on the 250-image split.
  assert results["teacher"]["top1_percent"] > 85
  expected = {"teacher", "generator_student_fp", "student_w4a4", "ptq_w4a4_max_dfqf",
              "ptq_w4a4_ft_dfqf", "ptq_w4a4_max_standard", "ptq_w4a4_ft_standard"}
  assert expected <= set(results)
  student = results["student_w4a4"]
  assert (student["weight_bits"], student["act_bits"], student["protocol"]) == (4, 4, "dfqf")
  # Fine-tuned on generated images, it keeps its generator; without adversarial_generator
  # the generator never trains: no optimizer state for it.
  state, _, _ = checkpoints.load_product(str(workdir / "student_w4a4"), "student_w4a4")
  assert jax.tree.leaves(state["generator"])
  assert not jax.tree.leaves(state.get("g_opt_state", {}))
  assert results["ptq_w4a4_max_standard"]["calibration"] == "max"
  for entry in results.values():
    assert 0.0 <= entry["top1_percent"] <= 100.0 and "drop_vs_teacher_points" in entry
  report = (workdir / "report.md").read_text()
  for name in expected:
    assert f"| {name} |" in report
  assert os.path.exists(workdir / "generator" / "grid.png")
  assert os.path.exists(workdir / "curves_student_w4a4.png")
  with open(workdir / "record.json") as f:
    record = json.load(f)
  assert record["results"]["student_w4a4"]["top1_percent"] == student["top1_percent"]
  assert {"command", "commit", "hardware", "wall_seconds", "date", "curves"} <= set(record)


def test_a_generator_trained_further_makes_the_pipeline_rebuild_what_was_built_on_it(
    pipeline_stopped_then_finished, tmp_path, small_data):
  workdir = tmp_path / "run"
  shutil.copytree(pipeline_stopped_then_finished[0], workdir)
  before = generator_origin(workdir)
  more = run_main("configs/generator.py:smoke", workdir, f"--config.data.dir={small_data}",
                  "--config.num_epochs=7")
  assert more.returncode == 0, more.stderr[-2000:]
  after = generator_origin(workdir)
  assert after["step"] == 14 and after["fingerprint"] != before["fingerprint"]

  # A single stage stops and says how to fix it; the pipeline rebuilds.
  alone = run_in_process("configs/finetune.py:w4a4", workdir, f"--config.data.dir={small_data}")
  assert alone.returncode == 2
  error = [line for line in alone.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1, alone.stderr[-2000:]
  assert "was built from generator step 12" in error[0]
  assert "now holds generator step 14" in error[0]
  assert "delete that folder" in error[0]
  # Evaluation alone scores the models left over and marks them, with no drop vs the teacher.
  scored = run_main("configs/evaluate.py", workdir, f"--config.data.dir={small_data}")
  assert scored.returncode == 0, scored.stderr[-2000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  why = (f"built from {checkpoints.describe_origin(before)}, but the workdir now holds "
         f"{checkpoints.describe_origin(after)}")
  assert downstream(results)
  for name, entry in downstream(results).items():
    assert entry["stale"] == why and "drop_vs_teacher_points" not in entry, name
  assert "stale" not in results["teacher"] and "stale" not in results["generator_student_fp"]
  assert "student_w4a4" in scored.stdout and "stale: built from generator step 12" in scored.stdout
  rerun = run_main("configs/pipeline.py:smoke", workdir,
                   *pipeline_args(small_data, generator_epochs=7))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "student_w4a4 in" in rerun.stdout and "rebuilding it" in rerun.stdout
  with open(workdir / "results.json") as f:
    results = json.load(f)
  for name, entry in downstream(results).items():
    assert entry["lineage"]["generator"] == after and "stale" not in entry, name
  report = (workdir / "report.md").read_text()
  student_row = next(line for line in report.splitlines() if line.startswith("| student_w4a4 |"))
  assert f"generator step 14 ({after['fingerprint'][:8]})" in student_row
