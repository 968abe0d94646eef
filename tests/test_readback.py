"""dfqf_jax.load reads every model of a finished smoke pipeline back, and its top-1 is the one
in results.json; the README's read-back snippet runs as written; what the stages would not
build on (unfinished, stale) is refused in one line."""
import ast
import contextlib
import io
import json
import os
import re
import shutil

import numpy as np
import pytest

from cli import run_in_process
from conftest import REPO, copy_workdir, write_small_split
from test_lineage import pipeline_stopped_then_finished  # noqa: F401 (the prepared pipeline)

import dfqf_jax
from dfqf_jax import checkpoints, data
from dfqf_jax.errors import UserError

# The prepared pipeline is built on the lineage tests' worker; here it is only copied.
pytestmark = pytest.mark.xdist_group("lineage")

README_HEADING = "## Read a model back"
STUDENT, EXPORT = "student_w4a4", "export_student_w4a4"
SNIPPET_SCORES = ("teacher", STUDENT, EXPORT)  # the models the README snippet test scores
TINY_TEST_SPLIT = 16  # images: every model here is scored several times, the integer one slowly


@pytest.fixture(scope="module")
def tiny_data(small_data, tmp_path_factory):
  """A test split of TINY_TEST_SPLIT images."""
  folder = tmp_path_factory.mktemp("tiny_data")
  write_small_split(os.path.join(small_data, "cifar10_test.npz"),
                    str(folder / "cifar10_test.npz"), TINY_TEST_SPLIT)
  return str(folder)


@pytest.fixture(scope="module")
def workdir(pipeline_stopped_then_finished, tiny_data, tmp_path_factory):
  """A copy of the finished smoke pipeline (teacher, generator, student_w4a4 and one PTQ
  model kept), student_w4a4 exported, the copy evaluated on tiny_data into its
  results.json."""
  source, _, rerun = pipeline_stopped_then_finished
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  workdir = copy_workdir(source, tmp_path_factory.mktemp("readback") / "run")
  for folder in os.listdir(workdir):
    if folder.startswith("ptq_") and folder != "ptq_w4a4_ft_dfqf":
      shutil.rmtree(workdir / folder)
  for job in ("configs/export.py", "configs/evaluate.py"):
    result = run_in_process(job, workdir, f"--config.data.dir={tiny_data}")
    assert result.returncode == 0, result.stderr[-2000:]
  return workdir


def results(workdir) -> dict:
  """results.json's entries of the models in `workdir` (those of the folders deleted from the
  copy are still listed; their checkpoints, relative to the workdir, are gone)."""
  with open(workdir / "results.json") as f:
    return {name: entry for name, entry in json.load(f).items()
            if (workdir / entry["checkpoint"]).exists()}


def readme_snippet() -> str:
  """The Python code block under the README's read-back heading."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  assert README_HEADING in readme, f"README.md has no {README_HEADING!r} section"
  section = readme.split(README_HEADING, 1)[1]
  block = re.search(r"```python\n(.*?)```", section, re.S)
  assert block, f"no ```python block under {README_HEADING!r}"
  return block[1]


def test_the_readme_snippet_reads_back_the_teacher_a_student_and_the_export(
    workdir, tiny_data):
  snippet = readme_snippet()
  for literal in ('"runs/smoke"', '"../shared/data"', f'"{STUDENT}"'):
    assert literal in snippet, literal  # what is substituted below
  images = data.load_split("cifar10", "test", tiny_data).images[:8]
  recorded = results(workdir)
  for name in SNIPPET_SCORES:
    code = (snippet.replace('"runs/smoke"', repr(str(workdir)))
            .replace('"../shared/data"', repr(tiny_data))
            .replace(f'"{STUDENT}"', repr(name), 1))
    namespace, stdout = {"images": images}, io.StringIO()
    with contextlib.redirect_stdout(stdout):
      exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    listed, scored = stdout.getvalue().splitlines()
    assert ast.literal_eval(listed) == dfqf_jax.list_models(str(workdir))
    printed_top1 = float(scored.split()[0])
    assert printed_top1 == recorded[name]["top1_percent"], name
    assert namespace["logits"].shape == (8, 10), name
    assert namespace["samples"].shape == (16, 32, 32, 3)
    assert namespace["samples"].dtype == np.uint8


def test_every_model_of_the_workdir_is_listed_loaded_and_scored_as_in_results_json(
    workdir, tiny_data):
  recorded = results(workdir)
  assert dfqf_jax.list_models(str(workdir)) == sorted({*recorded, "generator"})
  for name, entry in recorded.items():
    model = dfqf_jax.load(str(workdir), name)
    if name not in SNIPPET_SCORES:  # (scored by the README snippet's test)
      assert model.top1_percent(tiny_data) == entry["top1_percent"], name
    assert (model.step, model.finished, model.lineage) == (
        entry["step"], entry.get("finished", True), entry["lineage"]), name
    if "weight_bits" in entry:
      assert (model.quant.weight_bits, model.quant.act_bits, model.quant.protocol) == (
          entry["weight_bits"], entry["act_bits"], entry["protocol"]), name
  assert dfqf_jax.load(str(workdir), "teacher").quant is None


def test_evaluation_scores_the_export_as_the_student_it_was_exported_from(workdir):
  """The integer model read back from export/<student>/ scores what the fake-quantized
  checkpoint scores (at most one image differs: a rounding tie)."""
  recorded = results(workdir)
  entry = recorded[EXPORT]
  assert entry["integer"] and (entry["weight_bits"], entry["act_bits"]) == (4, 4)
  assert entry["checkpoint"] == "export/" + STUDENT  # relative to the workdir
  assert abs(entry["top1_percent"] - recorded[STUDENT]["top1_percent"]) <= 100 / TINY_TEST_SPLIT


def test_uint8_and_float_images_give_the_same_logits(workdir, tiny_data):
  """Up to a rounding tie: uint8 images are scaled to [0, 1] inside the jitted program, float
  ones by the caller, and an ulp between the two can move an activation across a 4-bit step
  (one image of 8 on an Intel host), so at most one image's logits may differ."""
  images = data.load_split("cifar10", "test", tiny_data).images[:8]  # the snippet test's
  for name in (STUDENT, EXPORT):
    model = dfqf_jax.load(str(workdir), name)
    from_uint8, from_float = model(images), model(images / np.float32(255))
    same = np.isclose(from_uint8, from_float, rtol=0, atol=1e-5).all(axis=1)
    assert same.sum() >= len(images) - 1, (name, same)


def test_generator_samples_are_images_determined_by_the_seed(workdir):
  generator = dfqf_jax.load(str(workdir), "generator")
  first = generator.sample(16, seed=1)
  assert first.shape == (16, 32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, generator.sample(16, seed=1))
  assert not np.array_equal(first, generator.sample(16, seed=2))


def rewrite_meta(workdir, stage: str, change) -> None:
  """Applies change(meta) to the metadata of the latest checkpoint of DIR/stage."""
  directory = workdir / stage
  path = directory / str(checkpoints.latest_step(str(directory))) / "meta" / "metadata"
  meta = json.loads(path.read_text())
  change(meta)
  path.write_text(json.dumps(meta))


def refusal(workdir, name) -> str:
  with pytest.raises(UserError) as refused:
    dfqf_jax.load(str(workdir), name)
  assert "\n" not in str(refused.value)
  return str(refused.value)


def test_an_unfinished_student_and_its_export_are_refused_unless_asked_for(workdir, tmp_path):
  workdir = copy_workdir(workdir, tmp_path / "run")

  def more_steps(meta):
    for description in (meta, *meta["classifiers"].values()):
      description["total_steps"] = 1000
  rewrite_meta(workdir, STUDENT, more_steps)
  graph_path = workdir / "export" / STUDENT / "model.json"  # an export of such a student
  graph = json.loads(graph_path.read_text())
  graph["source_origin"]["finished"] = False
  graph_path.write_text(json.dumps(graph))

  assert re.search(rf"{STUDENT} in .* is unfinished: its checkpoint .* is at step 2 of 1000; "
                   "rerun its stage to finish it, or load it with strict=False",
                   refusal(workdir, STUDENT))
  assert re.search(rf"{EXPORT} in .* was built from an unfinished {STUDENT} step 2 "
                   r"\(\w+, unfinished\); rerun the pipeline", refusal(workdir, EXPORT))
  assert not dfqf_jax.load(str(workdir), STUDENT, strict=False).finished
  assert dfqf_jax.load(str(workdir), "teacher").finished  # upstream of it: untouched


def test_a_student_built_from_another_generator_and_its_export_are_refused_as_stale(
    workdir, tmp_path):
  workdir = copy_workdir(workdir, tmp_path / "run")
  now = dfqf_jax.load(str(workdir), "generator").meta[checkpoints.ORIGIN]

  def other_generator(meta):
    for description in (meta, *meta["classifiers"].values()):
      description["lineage"]["generator"]["fingerprint"] = "0123456789abcdef"
  rewrite_meta(workdir, STUDENT, other_generator)

  assert re.search(
      rf"{STUDENT} in .* is stale: built from generator step {now['step']} \(01234567\), but "
      rf"the workdir now holds generator step {now['step']} \({now['fingerprint'][:8]}\); "
      "rerun the pipeline",
      refusal(workdir, STUDENT))
  assert f"{EXPORT} in " in refusal(workdir, EXPORT)
  assert f"built from {STUDENT}, itself stale" in refusal(workdir, EXPORT)
  assert dfqf_jax.load(str(workdir), STUDENT, strict=False).name == STUDENT


def test_an_unknown_name_or_workdir_is_one_line_naming_what_there_is(workdir, tmp_path):
  error = refusal(workdir, "student_w2a2")
  assert "holds no model 'student_w2a2'" in error and f"'{STUDENT}'" in error
  assert "does not exist" in refusal(tmp_path / "nowhere", STUDENT)
