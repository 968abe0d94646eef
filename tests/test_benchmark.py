"""benchmarks/benchmark.py writes complete rows (its JAX path; speed is never asserted)."""
import json
import math
import os
import subprocess
import sys

from cli import REPO, environment

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import benchmark  # noqa: E402

FIELDS = {"stage", "impl", "backend", "device_kind", "num_devices", "batch", "dtype",
          "images_per_s", "step_ms", "compile_s", "first_call_s", "peak_memory_bytes",
          "memory_kind", "cpu_model", "xla_flags", "versions", "commit", "dirty", "date",
          "run_id", "tag"}


def test_one_row_per_impl_stage_and_student_passes():
  args = benchmark.parse_args(["--stages", "generator,evaluate", "--student-passes", "1,2"])
  assert benchmark.planned_runs(args) == [
      ("jax", "generator", 1), ("jax", "generator", 2), ("torch", "generator", 2),
      ("jax", "evaluate", None), ("torch", "evaluate", None)]


def test_jax_evaluation_row_on_two_devices(tmp_path):
  out = tmp_path / "bench.jsonl"
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "benchmark.py"), "--impl", "jax",
       "--stages", "evaluate", "--evaluate-batch", "16", "--warmup", "1", "--repeats", "1",
       "--tag", "test", "--out", str(out)],
      cwd=REPO, env=environment(devices=2), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert FIELDS <= set(row)
  assert (row["stage"], row["impl"], row["backend"], row["num_devices"], row["batch"],
          row["tag"]) == ("evaluate", "jax", "cpu", 2, 16, "test")
  assert row["images_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0
  assert row["memory_kind"] == "process_peak_rss" and row["peak_memory_bytes"] > 0
  assert "device_count=2" in row["xla_flags"]


def test_every_jax_step_builds_and_traces():
  """The benchmark builds each stage's step from the stage's own functions; a stage whose
  signature changed must break here, not on the accelerator. (Traced, not compiled: what
  a step computes is the stages' tests' business. Built for a ResNet-8 and the smoke
  generator: the same functions, a fraction of the layers and channels to initialize, run
  and calibrate on.)"""
  import jax
  import jax_steps
  for stage in ("teacher", "generator", "finetune", "evaluate"):
    step = jax_steps.build(stage, 8, "float32", 1, depth=8, generator_schedule="smoke")
    shapes = jax.tree.leaves(jax.eval_shape(step.fn, *step.args))
    assert shapes and all(s.size >= 1 for s in shapes), stage


def test_loop_overhead_times_each_key_derivation(tmp_path):
  """benchmarks/loop_overhead.py: one row, a host time per step for each way of
  deriving a step's key (in-process: the suite's CPU devices; speed is not asserted: over 20
  steps the difference of two timings can come out negative)."""
  import loop_overhead
  out = tmp_path / "loop.jsonl"
  loop_overhead.main(["--steps", "20", "--tag", "test", "--out", str(out)])
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert set(row["us_per_step"]) == set(loop_overhead.KEYS)
  assert all(math.isfinite(us) for us in row["us_per_step"].values())
  assert (row["steps"], row["backend"], row["tag"]) == (20, "cpu", "test")
