"""The like-for-like table from run records: one row per image source x bits x protocol,
mean ± std over seeds with every run's number, the `ft` start and the compute per run."""
import importlib.util
import json
import os
import pathlib
import subprocess

import numpy as np

from dfqf_jax import image_sources, like_for_like, report


def record(source: str, seed: int, students: dict, workdir: str,
           date: str = "2026-12-01T10:00:00+00:00") -> dict:
  """A run record of one pipeline invocation that ended at `date`: students = name -> (bits,
  protocol, top-1, step-0 top-1)."""
  results = {"teacher": {"top1": 0.9173, "depth": 20}}
  curves = {}
  for name, (bits, protocol, top1, start) in students.items():
    results[name] = {"top1": top1, "weight_bits": bits, "act_bits": bits,
                     "protocol": protocol, "stage_wall_seconds": 100.0 + seed,
                     **({} if source == "dfqf" else {"images": source})}
    curves[name] = {"test_top1": [[0, start], [2000, top1]]}
  stage = image_sources.SOURCES[source].stage_dir
  return {"command": f"python main.py --config=configs/pipeline.py:budget --config.seed={seed}",
          "hardware": "2 x cpu", "workdir": workdir, "results": results, "curves": curves,
          "stage_folder_wall_seconds": {stage: 50.0}, "date": date}


def test_each_cell_is_the_mean_and_spread_of_its_seeds_with_every_run_named():
  records = {}
  for seed, (a, b) in enumerate([(0.90, 0.85), (0.91, 0.86), (0.92, 0.87)]):
    records[f"zeroq_{seed}.json"] = record(
        "zeroq", seed, {"student_w4a4_standard_zeroq": (4, "standard", a, 0.80),
                        "student_w3a3_standard_zeroq": (3, "standard", b, 0.50)}, f"z{seed}")
  # a second record of seed 0's workdir holds the same student again: counted once
  records["zeroq_0_again.json"] = record(
      "zeroq", 0, {"student_w4a4_standard_zeroq": (4, "standard", 0.90, 0.80)}, "z0")
  records["dfqf_0.json"] = record("dfqf", 0, {"student_w4a4": (4, "dfqf", 0.9092, 0.88)},
                                  "d0")
  text = like_for_like.table(records, report.schedule_of)
  lines = text.splitlines()
  assert lines[0].startswith("Like for like: teacher ResNet-20 91.73%")
  assert "schedule budget" in lines[0]
  rows = [l for l in lines if l.startswith("| ZeroQ") or l.startswith("| DFQF")]
  assert rows[0] == ("| DFQF | W4A4 | dfqf | 1 | 90.92 (1 run) | 90.92 / 90.92 | 0: 90.92 | "
                     "88.00 | 50 + 100 |")
  assert rows[1] == ("| ZeroQ | W4A4 | standard | 3 | 91.00 ± 1.00 | 90.00 / 92.00 | "
                     "0: 90.00, 1: 91.00, 2: 92.00 | 80.00, 80.00, 80.00 | "
                     "50 + 100, 50 + 101, 50 + 102 |")
  assert rows[2].startswith("| ZeroQ | W3A3 | standard | 3 | 86.00 ± 1.00 | 85.00 / 87.00 |")


def differences_of(tops: dict) -> list[list[str]]:
  """The rows of the differences below the table for W4A4 standard runs: source -> top-1s."""
  records = {f"{source}_{seed}.json": record(source, seed, {"student_w4a4_standard": (
      4, "standard", top1, 0.80)}, f"{source}{seed}")
      for source, values in tops.items() for seed, top1 in enumerate(values)}
  text = like_for_like.table(records, report.schedule_of)
  return [line.split(" | ")[2:] for line in text.splitlines() if line.startswith("| W4A4")]


def test_a_difference_is_a_finding_only_beyond_the_larger_seed_spread():
  rows = differences_of({"dfqf": [0.90, 0.91, 0.92],   # 91.00 ± 1.00
                         "zeroq": [0.86, 0.87, 0.88],  # 87.00 ± 1.00: 4 points below
                         "gdfq": [0.875, 0.915, 0.955]})  # 91.50 ± 4.00
  assert rows == [
      ["GDFQ − DFQF", "+0.50", "4.00", "overlap", "within the spread: no finding |"],
      ["GDFQ − ZeroQ", "+4.50", "4.00", "overlap",
       "beyond the spread, but the runs' ranges overlap |"],
      ["DFQF − ZeroQ", "+4.00", "1.00", "disjoint",
       "beyond the spread, every run above every run |"]]


def test_a_difference_within_the_spread_is_no_finding_even_with_disjoint_ranges():
  rows = differences_of({"dfqf": [0.90, 0.91, 0.95],  # 92.00 ± 2.65
                         "zeroq": [0.895, 0.896, 0.897],  # 89.60 ± 0.10, all below DFQF's
                         "gdfq": [0.90, 0.92, 0.94]})  # 92.00 ± 2.00: equal means
  assert rows[0] == ["DFQF − GDFQ", "+0.00", "2.65", "overlap",
                     "within the spread: no finding |"]
  assert rows[1] == ["DFQF − ZeroQ", "+2.40", "2.65", "disjoint",
                     "within the spread: no finding |"]


def test_runs_on_different_machines_name_their_machine_beside_their_compute():
  records = {f"zeroq_{seed}.json": record("zeroq", seed, {"student_w4a4_standard_zeroq": (
      4, "standard", 0.90, 0.80)}, f"z{seed}") for seed in range(3)}
  records["zeroq_2.json"]["hardware"] = "1 x gpu"
  lines = like_for_like.table(records, report.schedule_of).splitlines()
  assert lines[0].endswith("images' source the only change; (a) 1 x gpu; (b) 2 x cpu")
  assert lines[4].endswith("| 50 + 100 (b), 50 + 101 (b), 50 + 102 (a) |")
  del records["zeroq_2.json"]  # one machine: no tags
  lines = like_for_like.table(records, report.schedule_of).splitlines()
  assert lines[0].endswith("images' source the only change; 2 x cpu")
  assert lines[4].endswith("| 50 + 100, 50 + 101 |")


def test_a_student_built_on_another_seeds_images_is_no_run_of_its_seed(capsys):
  own = record("gdfq", 1, {"student_w4a4_standard_gdfq": (4, "standard", 0.90, 0.85)}, "g1")
  borrowed = record("gdfq", 2, {"student_w4a4_standard_gdfq": (4, "standard", 0.91, 0.85)},
                    "g2")
  for rec, upstream_seed in ((own, 1), (borrowed, 1)):
    rec["results"]["student_w4a4_standard_gdfq"]["lineage"] = {
        "gdfq_generator": {"stage": "gdfq_generator", "seed": upstream_seed}}
  rows = like_for_like.runs({"own.json": own, "borrowed.json": borrowed}, report.schedule_of)
  assert [(r["seed"], r["top1"]) for r in rows] == [(1, 90.0)]
  assert ("borrowed.json: student_w4a4_standard_gdfq (seed 2) left out of the like-for-like "
          "table: built on gdfq_generator of seed 1") in capsys.readouterr().err


def test_cells_are_ordered_by_weight_then_activation_bits():
  records = {f"dfqf_{a}.json": record("dfqf", 0, {f"student_w4a{a}": (4, "dfqf", 0.9, 0.8)},
                                      f"d{a}") for a in (2, 8, 4)}
  for a, rec in zip((2, 8, 4), records.values()):
    rec["results"][f"student_w4a{a}"]["act_bits"] = a
  rows = [line.split(" | ")[1] for line in like_for_like.table(records, report.schedule_of)
          .splitlines() if line.startswith("| DFQF")]
  assert rows == ["W4A8", "W4A4", "W4A2"]


def test_the_sources_of_one_bits_x_protocol_cell_are_rows_next_to_each_other():
  records = {f"{source}_{protocol}.json": record(
      source, 0, {f"student_{protocol}_{source}": (4, protocol, 0.9, 0.8)}, f"{source}")
      for source in ("gdfq", "dfqf", "zeroq") for protocol in ("standard", "dfqf")}
  rows = [line.split(" | ")[:3] for line in like_for_like.table(records, report.schedule_of)
          .splitlines() if line.startswith(("| DFQF", "| ZeroQ", "| GDFQ"))]
  assert rows == [["| DFQF", "W4A4", "dfqf"], ["| ZeroQ", "W4A4", "dfqf"],
                  ["| GDFQ", "W4A4", "dfqf"], ["| DFQF", "W4A4", "standard"],
                  ["| ZeroQ", "W4A4", "standard"], ["| GDFQ", "W4A4", "standard"]]


def test_a_cell_of_one_run_has_no_spread_to_judge_a_difference_by():
  rows = differences_of({"dfqf": [0.90], "zeroq": [0.80, 0.81, 0.82]})
  assert rows == [["DFQF − ZeroQ", "+9.00", "–", "–",
                   "no spread yet (a cell has 1 run): no finding |"]]
  assert differences_of({"dfqf": [0.90, 0.91]}) == []  # one source: nothing to compare


def test_compare_prints_the_like_for_like_table_above_the_published_numbers(tmp_path, capsys):
  path = tmp_path / "gdfq_seed0.json"
  path.write_text(json.dumps(record("gdfq", 0, {"student_w4a4_standard_gdfq": (
      4, "standard", 0.89, 0.85)}, "g0")))
  assert report._main(["--compare", str(path)]) == 0
  out = capsys.readouterr().out
  assert out.index("| GDFQ | W4A4 | standard | 1 | 89.00 (1 run)") < out.index(
      "Each beside the published numbers") < out.index("| GDFQ (this harness) student_w4a4")
  assert "| GDFQ | ResNet-20 | standard | the paper's | 93.89 | 90.25 |" in out


def test_a_record_with_top1_in_percent_gives_the_same_table():
  """The records above hold `top1` as a fraction, as those of experiments/ do; the project
  now writes `top1_percent` and curves `test_top1_percent`: the same table."""
  old = record("dfqf", 0, {"student_w4a4": (4, "dfqf", 0.9092, 0.88)}, "d0")
  new = json.loads(json.dumps(old))
  for entry in new["results"].values():
    entry["top1_percent"] = 100 * entry.pop("top1")
  new["curves"] = {name: {"test_top1_percent": [[s, 100 * v] for s, v in c["test_top1"]]}
                   for name, c in old["curves"].items()}
  assert like_for_like.table({"n.json": new}, report.schedule_of) == like_for_like.table(
      {"n.json": old}, report.schedule_of)


def test_beside_the_published_numbers_each_setting_is_one_row_over_its_seeds():
  records = {f"zeroq_{seed}.json": record(
      "zeroq", seed, {"student_w4a4_standard_zeroq": (4, "standard", top1, 0.80)}, f"z{seed}")
      for seed, top1 in enumerate([0.90, 0.91, 0.92])}
  # seed 0's workdir in a second record (a later cell of the same workdir, a path that sorts
  # first): counted once, credited to the run that built it
  records = {"zeroq_0_a_w3a3.json": record("zeroq", 0, {
      "student_w4a4_standard_zeroq": (4, "standard", 0.90, 0.80),
      "student_w3a3_standard_zeroq": (3, "standard", 0.70, 0.50)}, "z0",
      date="2026-12-01T09:30:00-02:00"), **records}  # 11:30 UTC: after the others' 10:00
  rows = [line.split(" | ") for line in report.comparison_table(records).splitlines()
          if line.startswith("| ZeroQ (this harness)")]
  assert len(rows) == 2
  w4a4, w3a3 = sorted(rows, key=lambda r: r[0])[::-1]
  # method, network, protocol, schedule, teacher, W4A4 top-1, W4A4 drop, W3A3 ..., PTQ start
  assert w4a4[4:10] == ["91.73", "91.00 ± 1.00 (3 runs)", "0.73", "", "", "80.00"]
  assert w4a4[10:] == ["100.0, 101.0, 102.0 s fine-tuning, 2 x cpu",
                       "zeroq_0.json, zeroq_1.json, zeroq_2.json |"]
  assert w3a3[4:10] == ["91.73", "", "", "70.00", "21.73", "50.00"]
  records["zeroq_2.json"]["hardware"] = "1 x gpu"  # seconds of different machines: tagged
  w4a4 = next(line.split(" | ") for line in report.comparison_table(records).splitlines()
              if line.startswith("| ZeroQ (this harness) student_w4a4"))
  assert w4a4[10] == "100.0 (b), 101.0 (b), 102.0 (a) s fine-tuning, (a) 1 x gpu; (b) 2 x cpu"


def test_runs_of_another_recipe_are_another_setting_not_another_seed():
  base = record("dfqf", 0, {"student_w3a3": (3, "dfqf", 0.8811, 0.7260)}, "budget")
  bn_train = record("dfqf", 0, {"student_w3a3": (3, "dfqf", 0.8874, 0.7260)}, "bn_train")
  bn_train["command"] += (" --workdir=runs/x --config.bits=w3a3 --config.record_to=r.json"
                          " --config.finetune_stage.student_bn_train=True")
  assert like_for_like.recipe_of(bn_train) == "finetune_stage.student_bn_train=True"
  records = {"budget.json": base, "bn_train.json": bn_train}
  text = like_for_like.table(records, report.schedule_of)
  assert text.count("| DFQF | W3A3 | dfqf | 1 |") == 2
  assert "schedule budget with finetune_stage.student_bn_train=True," in text
  protocols = [line.split(" | ")[2] for line in report.comparison_table(records).splitlines()
               if line.startswith("| DFQF (ours)")]
  assert sorted(protocols) == ["dfqf", "dfqf + finetune_stage.student_bn_train=True"]


def test_the_driver_runs_each_cell_once_and_skips_a_run_whose_record_exists(tmp_path):
  """run.sh calls main.py once per source x seed x cell, in the issue's order, and a rerun
  after an interruption skips the runs that wrote their record (a stand-in python logs the
  calls)."""
  log = tmp_path / "calls.txt"
  python = tmp_path / "python"
  python.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
  python.chmod(0o755)
  records = tmp_path / "records"
  records.mkdir()
  (records / "zeroq_seed1_w4a4_standard.json").write_text("{}")
  script = pathlib.Path(__file__).parents[1] / "experiments/like_for_like/run.sh"
  env = {**os.environ, "PYTHON": str(python), "RECORDS": str(records), "SEEDS": "0 1",
         "SOURCES": "dfqf zeroq", "CELLS": "w4a4:standard w3a3:standard"}
  out = subprocess.run([str(script)], env=env, check=True, capture_output=True, text=True)
  calls = log.read_text().splitlines()
  runs = [next(a.split("=", 1)[1] for a in c.split() if a.startswith("--config.record_to="))
          for c in calls[:-1]]
  assert [os.path.basename(r) for r in runs] == [
      "dfqf_seed0_w4a4_standard.json", "zeroq_seed0_w4a4_standard.json",
      "dfqf_seed1_w4a4_standard.json",
      "dfqf_seed0_w3a3_standard.json", "zeroq_seed0_w3a3_standard.json",
      "dfqf_seed1_w3a3_standard.json", "zeroq_seed1_w3a3_standard.json"]
  assert "zeroq seed 1 w4a4 standard" in out.stdout and "exists; skipped" in out.stdout
  assert calls[-1].startswith("-m dfqf_jax.report --compare")


def test_output_statistics_say_how_sure_a_model_is_and_which_classes_it_picks():
  path = pathlib.Path(__file__).parents[1] / "experiments/like_for_like/outputs_on_images.py"
  spec = importlib.util.spec_from_file_location("outputs_on_images", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  flat = np.zeros((4, 10))  # unsure: every class 0.1
  stats, argmax = module.output_statistics(flat)
  assert stats["max_softmax_mean"] == 0.1 and stats["entropy_mean"] == round(np.log(10), 4)
  sure = np.eye(10)[[3, 3, 5, 7]] * 50.0  # sure of classes 3, 3, 5, 7
  stats, _ = module.output_statistics(sure, teacher_argmax=np.array([3, 1, 5, 2]))
  assert stats["max_softmax_mean"] == 1.0 and stats["entropy_mean"] == 0.0
  assert stats["argmax_counts"] == [0, 0, 0, 2, 0, 1, 0, 1, 0, 0]
  assert stats["agreement_with_teacher"] == 0.5
