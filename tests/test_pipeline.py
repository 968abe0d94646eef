"""The smoke pipeline end to end: every stage, report and complete results.json."""
import json
import os

from cli import run_main
from conftest import SMALL_DATA, TEACHER_WEIGHTS


def test_smoke_pipeline_runs_every_stage_and_reports(tmp_path, small_data):
  result = run_main("configs/pipeline.py:smoke", tmp_path, f"--config.data.dir={SMALL_DATA}",
                    f"--config.teacher_weights={TEACHER_WEIGHTS}",
                    f"--config.record_to={tmp_path / 'record.json'}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  # The imported teacher with its own normalization (its exact 91.73% on the full test split:
  # tests/test_models.py); here on the 500-image split.
  assert results["teacher"]["top1"] > 0.85
  expected = {"teacher", "generator_student_fp", "student_w4a4", "ptq_w4a4_max_dfqf",
              "ptq_w4a4_ft_dfqf", "ptq_w4a4_max_standard", "ptq_w4a4_ft_standard"}
  assert expected <= set(results)
  student = results["student_w4a4"]
  assert (student["weight_bits"], student["act_bits"], student["protocol"]) == (4, 4, "dfqf")
  assert results["ptq_w4a4_max_standard"]["calibration"] == "max"
  for entry in results.values():
    assert 0.0 <= entry["top1"] <= 1.0 and "drop_vs_teacher" in entry
  report = (tmp_path / "report.md").read_text()
  for name in expected:
    assert f"| {name} |" in report
  assert os.path.exists(tmp_path / "generator" / "grid.png")
  assert os.path.exists(tmp_path / "curves_student_w4a4.png")
  with open(tmp_path / "record.json") as f:
    record = json.load(f)
  assert record["results"]["student_w4a4"]["top1"] == student["top1"]
  assert {"command", "commit", "hardware", "wall_seconds", "date", "curves"} <= set(record)
