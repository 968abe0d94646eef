"""The comparison table: our students' drops beside the published ones, each traceable."""
import json

import pytest

from dfqf_jax import report


def record(teacher: float, students: dict, ptq: dict, depth: int = 20) -> dict:
  """A run record with these top-1s (percent), as the project writes them."""
  results = {"teacher": {"top1_percent": teacher, "depth": depth}}
  for name, (w, a, protocol, top1) in students.items():
    results[name] = {"weight_bits": w, "act_bits": a, "protocol": protocol, "top1_percent": top1}
  results.update({name: {"top1_percent": top1} for name, top1 in ptq.items()})
  return {"results": results, "stage_wall_seconds_total": 12.5, "hardware": "test host",
          "command": "python main.py --config=configs/pipeline.py:budget --workdir=w"}


def test_the_table_puts_each_student_in_its_bit_width_with_drop_and_ptq_start(tmp_path):
  records = {
      "a.json": record(92.0, {"student_w4a4": (4, 4, "dfqf", 91.0)},
                       {"ptq_w4a4_ft_dfqf": 85.0}),
      "b.json": record(90.0, {"student_w3a3_standard": (3, 3, "standard", 80.0)}, {},
                       depth=56)}
  rows = {r["method"]: r for r in report.comparison_rows(records)}
  w4 = rows["DFQF (ours) student_w4a4"]
  assert (w4["network"], w4["schedule"], w4["bits"], w4["ptq_start"], w4["source"]) == (
      "ResNet-20", "budget", (4, 4), 85.0, "a.json")
  assert w4["drop"] == pytest.approx(1.0)
  w3 = rows["DFQF (ours) student_w3a3_standard"]
  assert w3["drop"] == pytest.approx(10.0) and w3["ptq_start"] is None

  for path, content in records.items():
    (tmp_path / path).write_text(json.dumps(content))
  out = tmp_path / "table.md"
  report._main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                "--out", str(out)])
  lines = out.read_text().splitlines()
  ours = next(l for l in lines if "student_w3a3_standard" in l).split(" | ")
  # columns: method, network, protocol, schedule, teacher, W4A4 top-1, W4A4 drop, W3A3 top-1,
  # W3A3 drop
  assert ours[1:9] == ["ResNet-56", "standard", "budget", "90.00", "", "", "80.00", "10.00"]
  synq = next(l for l in lines if l.startswith("| SynQ |")).split(" | ")
  # the network and drops the issue cites
  assert synq[1:9] == ["ResNet-20", "standard", "the paper's", "93.89", "92.76", "1.13", "88.11",
                       "5.78"]
  gdfq = next(l for l in lines if l.startswith("| GDFQ |")).split(" | ")
  assert gdfq[7:9] == ["–", "–"]  # no published W3A3 number


@pytest.mark.parametrize("command, schedule", [
    ("main.py --config=configs/pipeline.py:reference --workdir=w", "reference"),
    ("main.py --config=configs/pipeline.py:reference --config.compute_dtype=bfloat16",
     "reference, bfloat16"),
    ("main.py --config=configs/finetune.py:w4a4 --workdir=w", "")])
def test_the_schedule_column_names_the_pipeline_schedule_and_a_set_compute_dtype(command,
                                                                                schedule):
  assert report.schedule_of({"command": command}) == schedule


def test_a_missing_record_is_one_error_line_naming_it(tmp_path, capsys):
  missing = str(tmp_path / "nope.json")
  assert report._main(["--compare", missing]) == 2
  assert capsys.readouterr().err.startswith(f"error: no record at {missing}; ")


def test_a_stale_student_is_left_out_of_the_table_with_one_line_saying_why(capsys):
  results = record(92.0, {"student_w4a4": (4, 4, "dfqf", 91.0),
                          "student_w3a3": (3, 3, "dfqf", 88.0)}, {})["results"]
  results["student_w3a3"]["stale"] = "built from generator step 12 (aaaa), but ..."
  results["ptq_w4a4_ft_dfqf"] = {"top1_percent": 85.0,
                                 "stale": "built from teacher step 0 (bbbb), ..."}
  rows = report.comparison_rows({"r.json": results})
  assert [r["method"] for r in rows] == ["DFQF (ours) student_w4a4"]
  assert rows[0]["ptq_start"] is None  # not the start of this student
  assert capsys.readouterr().err.splitlines() == [
      "r.json: student_w3a3 left out: stale, built from generator step 12 (aaaa), but ..."]


@pytest.mark.parametrize("name, content, phrase", [
    ("bad.json", '{"results": {"teacher": ', "is not a JSON document"),
    ("benchmarks.jsonl", '{"a": 1}\n{"b": 2}\n', "one JSON object per line"),
    ("list.json", "[1, 2]", "holds no results"),
])
def test_a_file_that_is_not_a_record_is_one_error_line(tmp_path, capsys, name, content, phrase):
  (tmp_path / name).write_text(content)
  assert report._main([str(tmp_path / name)]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / name} ") and phrase in err[0]


def test_a_smoke_run_is_labelled_as_such_beside_the_published_numbers(tmp_path):
  results = record(92.0, {"student_w4a4": (4, 4, "dfqf", 10.0)}, {})["results"]
  for entry in results.values():
    entry["schedule"] = "smoke"  # as the pipeline writes it into results.json
  table = report.comparison_table({"results.json": results})
  ours = next(l for l in table.splitlines() if "student_w4a4" in l).split(" | ")
  assert ours[0] == "| DFQF (ours) student_w4a4 (smoke run: not a result)" and ours[3] == "smoke"
  assert "say nothing about the method" in table


def test_a_record_written_before_top1_was_named_for_its_unit_reads_in_percent():
  """Records of the experiments/ folders hold `top1` as a fraction: the same table."""
  new = record(92.0, {"student_w4a4": (4, 4, "dfqf", 91.0)}, {"ptq_w4a4_ft_dfqf": 85.0})
  old = {**new, "results": {name: {("top1" if k == "top1_percent" else k):
                                    (v / 100 if k == "top1_percent" else v)
                                    for k, v in entry.items()}
                             for name, entry in new["results"].items()}}
  rows = lambda r: [(row["top1"], row["drop"], row["ptq_start"], row["teacher"])
                    for row in report.comparison_rows({"r.json": r})]
  assert rows(old) == pytest.approx(rows(new)) and rows(new) == [(91.0, 1.0, 85.0, 92.0)]


def test_curves_have_labelled_axes_and_whole_step_ticks(tmp_path, monkeypatch):
  stage = tmp_path / "student_w4a4"
  stage.mkdir()
  rows = [{"step": s, "loss_kd": 1.0 / s, "test_top1_percent": 80.0 + s} for s in (1, 2, 3)]
  (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  figures = []
  monkeypatch.setattr(report.storage, "save_figure",
                      lambda save, path: figures.append(save.__defaults__[0]))
  assert report.plot_curves(str(tmp_path), str(tmp_path)) == ["curves_student_w4a4.png"]
  axes = figures[0].axes
  assert [(a.get_title(), a.get_xlabel(), a.get_ylabel()) for a in axes] == [
      ("test_top1_percent", "training step", "top-1 (%)"),
      ("loss_kd", "training step", "loss")]
  for ax in axes:
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_all_stages_counts_every_stage_folder_also_one_without_a_classifier(tmp_path):
  """ZeroQ's images (no checkpoint of a classifier) and GDFQ's warm-up are compute too: the
  record's total and the compute column count every stage folder once."""
  from dfqf_jax import training
  for stage, seconds in (("zeroq", 100.0), ("student_w4a4_standard_zeroq", 50.5)):
    (tmp_path / stage).mkdir()
    (tmp_path / stage / training.WALL_FILE).write_text(json.dumps({"seconds": seconds}))
  written = report.record_run(str(tmp_path / "record.json"), str(tmp_path), {}, 1.0)
  assert written["stage_wall_seconds_total"] == 150.5
  student = {"stage_wall_seconds": 50.5}
  assert report._compute(written, student).startswith("50.5 s fine-tuning (150.5 s all stages)")
  # a record written before every folder was counted: the folders, not its old total
  older = {**written, "stage_wall_seconds_total": 50.5}
  assert "(150.5 s all stages)" in report._compute(older, student)
