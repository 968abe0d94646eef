"""Evaluation marks every model built from upstream checkpoints the workdir no longer holds."""
from dfqf_jax import scoring
from dfqf_jax.stages import evaluate


def origin(stage: str, fingerprint: str, step: int = 10) -> dict:
  return {"stage": stage, "step": step, "fingerprint": fingerprint, "finished": True}


def entry(own: dict, **lineage) -> dict:
  return {"top1_percent": 90.0, "origin": own, "lineage": lineage}


TEACHER, GENERATOR = origin("teacher", "t1", 0), origin("generator", "g2", 14)


def test_a_model_is_stale_iff_an_upstream_checkpoint_it_names_is_no_longer_the_workdirs():
  results = {
      "teacher": entry(TEACHER),
      "generator_student_fp": entry(GENERATOR, teacher=TEACHER),
      "student_w4a4": entry(origin("student_w4a4", "s1"), teacher=TEACHER, generator=GENERATOR),
      "student_w3a3": entry(origin("student_w3a3", "s2"), teacher=TEACHER,
                            generator=origin("generator", "g1", 12)),
      "ptq_w4a4_max_dfqf": entry(origin("ptq_w4a4_max_dfqf", "p1"),
                                 teacher=origin("teacher", "t0", 0)),
      # an export records the student checkpoint it came from
      "export_student_w4a4": {"top1_percent": 90.0,
                              "lineage": {"student_w4a4": origin("student_w4a4", "s0")}},
  }
  reasons = scoring.stale_reasons(results, held=results)
  assert set(reasons) == {"student_w3a3", "ptq_w4a4_max_dfqf", "export_student_w4a4"}
  assert reasons["student_w3a3"] == ("built from generator step 12 (g1), but the workdir now "
                                     "holds generator step 14 (g2)")
  assert "built from teacher step 0 (t0)" in reasons["ptq_w4a4_max_dfqf"]
  assert "student_w4a4 step 10 (s0)" in reasons["export_student_w4a4"]
  # Built from a stage this workdir has no checkpoint of (generator_dir elsewhere): not stale.
  del results["generator_student_fp"]
  assert set(scoring.stale_reasons(results, held=results)) == {"ptq_w4a4_max_dfqf",
                                                               "export_student_w4a4"}


def test_the_mark_replaces_an_old_one_and_a_stale_model_has_no_drop_against_the_teacher():
  results = {"teacher": entry(TEACHER),
             "student_w4a4": {**entry(origin("student_w4a4", "s1"), teacher=TEACHER),
                              "stale": "an old reason", "drop_vs_teacher_points": 1.0},
             "student_w3a3": {**entry(origin("student_w3a3", "s2"),
                                      teacher=origin("teacher", "t0", 0)),
                              "drop_vs_teacher_points": 4.0}}
  marked = evaluate.with_staleness(results, held=results)
  assert "stale" not in marked["student_w4a4"] and marked["student_w4a4"]["drop_vs_teacher_points"]
  assert marked["student_w3a3"]["stale"].startswith("built from teacher step 0 (t0)")
  assert "drop_vs_teacher_points" not in marked["student_w3a3"]
  assert "stale" in results["student_w4a4"]  # the input is not changed


def test_staleness_runs_down_the_chain_to_the_export_of_a_stale_student():
  """The generator trained further: its student is stale, and so is that student's export,
  though the student's checkpoint is the one it was exported from."""
  student = origin("student_w4a4", "s1")
  results = {"generator_student_fp": entry(GENERATOR, teacher=TEACHER),
             "student_w4a4": entry(student, generator=origin("generator", "g1", 12)),
             "export_student_w4a4": {"top1_percent": 90.0, "lineage": {"student_w4a4": student}}}
  reasons = scoring.stale_reasons(results, held=results)
  assert reasons["export_student_w4a4"] == (
      "built from student_w4a4, itself stale: " + reasons["student_w4a4"])


def test_only_the_checkpoints_evaluated_now_say_what_the_workdir_holds():
  """An older entry still on disk (Orbax keeps two steps) is not taken as the current one."""
  old_generator = entry(origin("generator", "g1", 12), teacher=TEACHER)
  student = entry(origin("student_w4a4", "s1"), generator=GENERATOR)
  merged = {"generator_student_fp": entry(GENERATOR), "generator_student_fp_old": old_generator,
            "student_w4a4": student}
  assert set(scoring.stale_reasons(merged, held=merged)) == {"student_w4a4"}  # the old one
  assert not scoring.stale_reasons(merged, held={"generator_student_fp": entry(GENERATOR),
                                                  "student_w4a4": student})
