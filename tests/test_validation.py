"""Bad input: one clear error naming the problem and the fix, exit code 2, nothing written.

main.py's command lines run in this test process (cli.run_in_process, 8 CPU devices): what
they print and write is what a new process prints and writes, without its start-up."""
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

from cli import run_in_process
from conftest import SHARED_DATA, SMALL_TEACHER_ARGS, TEACHER_WEIGHTS, copy_workdir
from dfqf_jax import checkpoints, errors, validation
from dfqf_jax.stages import ptq

TEACHER_SMOKE = "configs/teacher.py:smoke"
GENERATOR_SMOKE = "configs/generator.py:smoke"
PTQ = "configs/ptq.py:w4a4"


def assert_clean_failure(result, workdir, *phrases):
  assert result.returncode == 2, result.stderr[-2000:]
  error_lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1, result.stderr[-2000:]
  for phrase in phrases:
    assert phrase in error_lines[0], error_lines[0]
  return error_lines[0]


def nothing_written(workdir):
  return not os.path.exists(workdir) or not any(
      files for _, _, files in os.walk(workdir))


@pytest.fixture
def imported_teacher(imported_workdir, tmp_path):
  """A workdir holding the imported teacher (a fresh copy for each test)."""
  return copy_workdir(imported_workdir, tmp_path / "imported")


CASES = {
    "unknown dataset": (TEACHER_SMOKE, ["--config.data.name=mnist"],
                        ["config.data.name='mnist'", "cifar10"]),
    "data dir without files": (TEACHER_SMOKE, ["--config.data.dir=/nonexistent"],
                               ["no cifar10_train.npz", "DFQF_DATA_DIR"]),
    "TFDS dataset not prepared": (TEACHER_SMOKE, ["--config.data.dir=tfds",
                                                  "--config.data.tfds.data_dir=/nonexistent"],
                                  ["TFDS 'cifar10' is not prepared in /nonexistent",
                                   "dfqf_jax.tools.prepare_tfds"]),
    "batch not divisible by devices": (TEACHER_SMOKE, ["--config.batch_size=12"],
                                       ["config.batch_size=12", "multiple of the 8 devices"]),
    "non-positive learning rate": (TEACHER_SMOKE, ["--config.learning_rate=0"],
                                   ["config.learning_rate=0"]),
    "negative seed": (TEACHER_SMOKE, ["--config.seed=-1"],
                      ["config.seed=-1", "an integer from 0 to 4294966"]),
    "seed past the random keys": ("configs/pipeline.py:smoke", ["--config.seed=4294967"],
                                  ["config.seed=4294967", "an integer from 0 to 4294966"]),
    "unknown depth": (TEACHER_SMOKE, ["--config.model.depth=18"], ["config.model.depth=18"]),
    "unknown compute dtype": (TEACHER_SMOKE, ["--config.compute_dtype=float16"],
                              ["config.compute_dtype='float16'", "bfloat16"]),
    "weights of another depth": ("configs/import_teacher.py",
                                 [f"--config.weights={TEACHER_WEIGHTS}",
                                  "--config.model.depth=32"],
                                 ["ResNet-32", "set model.depth"]),
    "pretrained weights of another depth": ("configs/import_teacher.py",
                                            ["--config.weights=resnet56_cifar10"],
                                            ["ResNet-56 trained on cifar10",
                                             "--config.model.depth=56"]),
    "missing weights file": ("configs/import_teacher.py", ["--config.weights=/no/such.npz"],
                             ["neither a file nor a pretrained name", "resnet20_cifar10"]),
    "zero loss weight": (GENERATOR_SMOKE, ["--config.lambda_bn=0"],
                         ["config.lambda_bn=0", "> 0"]),
    "negative loss weight": (GENERATOR_SMOKE, ["--config.lambda_adv=-5"],
                             ["config.lambda_adv=-5"]),
    "odd generator width": (GENERATOR_SMOKE, ["--config.generator.width=15"],
                            ["config.generator.width=15", "an even number"]),
    "odd GDFQ generator width": ("configs/gdfq.py:smoke", ["--config.width=15"],
                                 ["config.width=15", "an even number"]),
    "unknown GDFQ lr milestone base": ("configs/gdfq.py:smoke",
                                       ["--config.lr_milestones_of=epochs"],
                                       ["config.lr_milestones_of='epochs'", "finetuning"]),
    "missing teacher checkpoint": (GENERATOR_SMOKE, [],
                                   ["no teacher checkpoint", "run the teacher stage"]),
    "bits above 8": ("configs/ptq.py:w9a4", [], ["config.bits='w9a4'", "32"]),
    "bits below 2": ("configs/finetune.py:w1a1", [], ["config.bits='w1a1'"]),
    "malformed bits": ("configs/ptq.py:4bit", [], ["config.bits='4bit'", "w<bits>a<bits>"]),
    "unknown calibration": (PTQ, ["--config.calibration=percentile"],
                            ["config.calibration='percentile'", "mse"]),
    "unknown protocol": (PTQ, ["--config.protocol=lsq"], ["config.protocol='lsq'"]),
    "unknown calibration data": (PTQ, ["--config.calibration_data=imagenet"],
                                 ["config.calibration_data='imagenet'"]),
    "adversarial generator on real images": (
        "configs/finetune.py:w4a4,smoke",
        ["--config.adversarial_generator=True", "--config.data_source=real"],
        ["config.adversarial_generator=True", "config.data_source='real'", "turn one"]),
    "several students in one finetune": ("configs/finetune.py:w4a4,w8a8", [],
                                         ["finetune trains one student"]),
    "unknown image source": ("configs/pipeline.py:smoke", ["--config.images=dreams"],
                             ["config.images='dreams'", "zeroq", "gdfq"]),
    "zeroq images with the adversarial generator": (
        "configs/finetune.py:w4a4,smoke",
        ["--config.images=zeroq", "--config.adversarial_generator=True"],
        ["config.images='zeroq'", "adversarial_generator"]),
    "zeroq batches not a multiple of those at once": (
        "configs/zeroq.py:smoke", ["--config.concurrent_batches=3"],
        ["config.num_batches=4", "config.concurrent_batches=3"]),
    "pipeline with a bad stage field": ("configs/pipeline.py:smoke",
                                        ["--config.finetune_stage.learning_rate=-1"],
                                        ["config.learning_rate=-1"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, shared_data):
  config, overrides, phrases = CASES[case]
  workdir = tmp_path / "run"
  if "--config.data.dir" not in " ".join(overrides):
    overrides = [f"--config.data.dir={SHARED_DATA}", *overrides]
  result = run_in_process(config, workdir, *overrides)
  assert_clean_failure(result, workdir, *phrases)
  assert nothing_written(workdir)


def test_latent_size_mismatch_with_generator_checkpoint(generator_workdir, tmp_path, small_data):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")  # latent_dim=32 (smoke)
  before = sorted(os.listdir(workdir / "generator"))
  result = run_in_process(GENERATOR_SMOKE, workdir, *SMALL_TEACHER_ARGS,
                          f"--config.data.dir={small_data}", "--config.generator.latent_dim=64")
  assert_clean_failure(result, workdir, "latent_dim=32", "latent_dim=64")
  assert sorted(os.listdir(workdir / "generator")) == before


def test_generator_width_mismatch_with_generator_checkpoint(generator_workdir, tmp_path,
                                                           small_data):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")  # width 16 (smoke)
  before = sorted(os.listdir(workdir / "generator"))
  result = run_in_process(GENERATOR_SMOKE, workdir, *SMALL_TEACHER_ARGS,
                          f"--config.data.dir={small_data}", "--config.generator.width=32")
  assert_clean_failure(result, workdir, "width=16", "width=32")
  assert sorted(os.listdir(workdir / "generator")) == before


def test_a_generator_checkpoint_without_its_width_is_the_reference_width():
  """Stage-1 checkpoints written before the width was recorded had the reference's 128."""
  old = {"arch": "dafl_generator", "latent_dim": 1000}
  checkpoints.check_compatible(old, {**old, "width": 128}, "generator")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"width=128 \(not recorded.*, but this run has width=16"):
    checkpoints.check_compatible(old, {**old, "width": 16}, "generator")


def test_a_checkpoint_resumes_only_with_its_own_seed(generator_workdir, tmp_path, small_data):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")  # seed 0
  before = sorted(os.listdir(workdir / "generator"))
  result = run_in_process(GENERATOR_SMOKE, workdir, *SMALL_TEACHER_ARGS,
                          f"--config.data.dir={small_data}", "--config.seed=2")
  assert_clean_failure(result, workdir, "checkpoint of seed 0, but this run has seed 2",
                       "--config.seed=0")
  assert sorted(os.listdir(workdir / "generator")) == before


def test_a_ptq_model_is_kept_only_for_its_own_seed(generator_workdir, tmp_path, small_data):
  workdir = copy_workdir(generator_workdir, tmp_path / "run")
  args = [*SMALL_TEACHER_ARGS, f"--config.data.dir={small_data}", "--config.calibration=max"]
  assert run_in_process("configs/ptq.py:w4a4,smoke", workdir, *args).returncode == 0
  before = sorted(os.listdir(workdir))
  result = run_in_process("configs/ptq.py:w4a4,smoke", workdir, *args, "--config.seed=1")
  assert_clean_failure(result, workdir, "ptq_w4a4_max", "checkpoint of seed 0",
                       "this run has seed 1")
  assert sorted(os.listdir(workdir)) == before


def test_a_checkpoint_that_does_not_record_its_seed_resumes_only_with_seed_0():
  """Written before checkpoints recorded their seed, when seeds >= 1 drew other streams
  (rng.py): seed 0's streams are unchanged, any other seed's are not."""
  old = {"arch": "dafl_generator", "latent_dim": 1000, "width": 128}
  checkpoints.check_compatible(old, {**old, "seed": 0}, "generator")
  checkpoints.check_compatible({**old, "seed": 1}, {**old, "seed": 1}, "generator")
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"does not record its seed .* resuming it with seed 1 would not"):
    checkpoints.check_compatible(old, {**old, "seed": 1}, "generator")


@pytest.mark.parametrize("job, overrides", [(GENERATOR_SMOKE, []),
                                            (PTQ, ["--config.calibration_data=real"])])
def test_teacher_of_another_depth_is_rejected_by_stages_1_and_2(imported_teacher, shared_data,
                                                               job, overrides):
  result = run_in_process(job, imported_teacher, f"--config.data.dir={SHARED_DATA}",
                          "--config.model.depth=32", *overrides)
  assert_clean_failure(result, imported_teacher, "ResNet-20", "config.model.depth=32")
  assert sorted(os.listdir(imported_teacher)) == ["teacher"]


# ---- files that are broken, and config / workdir problems caught before any work ---------
def data_dir_with(tmp_path, small_data, split: str, **changes):
  """A copy of the small data folder whose `split` file has `changes` applied."""
  folder = tmp_path / "data"
  shutil.copytree(small_data, folder)
  path = folder / f"cifar10_{split}.npz"
  with np.load(path) as f:
    arrays = dict(f)
  arrays.update(changes)
  np.savez(path, **arrays)
  return folder


def truncated_copy(src, dst):
  dst.write_bytes(open(src, "rb").read()[:5000])
  return dst


def test_test_labels_out_of_range_are_rejected_before_evaluation(imported_teacher, tmp_path,
                                                                 small_data):
  labels = np.load(os.path.join(small_data, "cifar10_test.npz"))["labels"].copy()
  labels[7] = 10
  folder = data_dir_with(tmp_path, small_data, "test", labels=labels)
  result = run_in_process("configs/evaluate.py", imported_teacher, f"--config.data.dir={folder}")
  assert_clean_failure(result, imported_teacher, "cifar10_test.npz", "[0, 10]", "10 classes")
  assert not (imported_teacher / "results.json").exists()


def test_test_labels_out_of_range_are_rejected_before_the_pipeline_imports_the_teacher(
    tmp_path, small_data):
  labels = np.load(os.path.join(small_data, "cifar10_test.npz"))["labels"].copy()
  labels[7] = 10
  folder = data_dir_with(tmp_path, small_data, "test", labels=labels)
  result = run_in_process("configs/pipeline.py:smoke", tmp_path / "run",
                          f"--config.data.dir={folder}",
                          f"--config.teacher_weights={TEACHER_WEIGHTS}")
  assert_clean_failure(result, tmp_path / "run", "cifar10_test.npz", "[0, 10]", "10 classes")
  assert nothing_written(tmp_path / "run")


def test_train_labels_out_of_range_are_rejected_before_training(tmp_path, small_data):
  labels = np.load(os.path.join(small_data, "cifar10_train.npz"))["labels"].copy()
  labels[3] = -1
  folder = data_dir_with(tmp_path, small_data, "train", labels=labels)
  result = run_in_process(TEACHER_SMOKE, tmp_path / "run", f"--config.data.dir={folder}")
  assert_clean_failure(result, tmp_path / "run", "cifar10_train.npz", "[-1, 9]")
  assert nothing_written(tmp_path / "run")


def test_a_truncated_or_pickled_data_file_is_named(imported_teacher, tmp_path, small_data):
  folder = data_dir_with(tmp_path, small_data, "test")
  truncated_copy(os.path.join(small_data, "cifar10_test.npz"), folder / "cifar10_test.npz")
  result = run_in_process("configs/evaluate.py", imported_teacher, f"--config.data.dir={folder}")
  assert_clean_failure(result, imported_teacher, "cifar10_test.npz", "not a readable .npz")
  np.savez(folder / "cifar10_test.npz", images=np.zeros((2, 32, 32, 3), np.uint8),
           labels=np.array([{"a": 1}, None], dtype=object))
  result = run_in_process("configs/evaluate.py", imported_teacher, f"--config.data.dir={folder}")
  assert_clean_failure(result, imported_teacher, "cifar10_test.npz", "need pickle")
  assert not (imported_teacher / "results.json").exists()


def test_a_teacher_is_imported_once_and_never_replaced(imported_teacher, tmp_path):
  """The same weights again: kept, nothing written; other weights: refused (checkpoints are
  never overwritten)."""
  files = lambda: sorted((os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
                         for d, _, fs in os.walk(imported_teacher) for f in fs)
  before = files()
  again = run_in_process("configs/import_teacher.py", imported_teacher,
                         f"--config.weights={TEACHER_WEIGHTS}")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "already holds these weights; nothing to do" in again.stdout
  other = tmp_path / "other_weights.npz"
  shutil.copy(TEACHER_WEIGHTS, other)
  refused = run_in_process("configs/import_teacher.py", imported_teacher,
                           f"--config.weights={other}")
  assert_clean_failure(refused, imported_teacher, "already holds a teacher from",
                       "resnet20-12fca82f_weights.npz", "use another --workdir")
  assert files() == before


@pytest.mark.parametrize("damage", ["nan", "truncated", "pickled"])
def test_broken_teacher_weights_are_rejected_on_import(tmp_path, damage):
  weights = dict(np.load(TEACHER_WEIGHTS))
  path = tmp_path / "weights.npz"
  if damage == "nan":
    weights["module.layer2.1.conv1.weight"][0, 0, 0, 0] = np.nan
    np.savez(path, **weights)
    phrases = ["'module.layer2.1.conv1.weight'", "NaN"]
  elif damage == "truncated":
    truncated_copy(TEACHER_WEIGHTS, path)
    phrases = ["weights.npz", "not a readable .npz"]
  else:
    np.savez(path, **weights, extra=np.array([object()], dtype=object))
    phrases = ["weights.npz", "need pickle"]
  result = run_in_process("configs/import_teacher.py", tmp_path / "run", f"--config.weights={path}")
  assert_clean_failure(result, tmp_path / "run", *phrases)
  assert nothing_written(tmp_path / "run")


@pytest.mark.parametrize("config,overrides,phrases", [
    (GENERATOR_SMOKE, ["--config.no_such=1"], ["--config.no_such=1", "no field 'no_such'"]),
    (GENERATOR_SMOKE, ["--config.generator.no_such=1"], ["no field 'no_such'"]),
    ("configs/generator.py:foo", [], ["configs/generator.py:foo is unknown", "smoke"]),
    ("configs/pipeline.py:smoke", ["--config.bits="], ["config.bits=''", "no student"]),
    (GENERATOR_SMOKE, ["--config.on_stale_upstream=ignore"],
     ["config.on_stale_upstream='ignore'"]),
    ("configs/pipeline.py:smoke", ["--config.generator_stage.seed=3"],
     ["--config.generator_stage.seed=3", "no field 'seed'"]),
    ("configs/pipeline.py:smoke", ["--config.generator_stage.data.dir=/elsewhere"],
     ["no field 'dir'"]),
    ("configs/pipeline.py:smoke", ["--config.log_every_steps=5"], ["no field 'log_every_steps'"]),
    ("configs/pipeline.py:smoke", ["--config.seed=1", "--config.finetune_stage.lerning_rate=0.01"],
     ["error: --config.finetune_stage.lerning_rate=0.01: the config has no field "
      "'lerning_rate' (did you mean 'learning_rate'?)"]),
], ids=["unknown field", "unknown nested field", "unknown config argument", "empty bits",
        "unknown stale-upstream policy", "stage field the pipeline sets",
        "stage data field the pipeline sets", "pipeline field only stages have",
        "misspelt field of a stage"])
def test_config_errors(tmp_path, config, overrides, phrases, small_data):
  result = run_in_process(config, tmp_path / "run", f"--config.data.dir={small_data}", *overrides)
  assert_clean_failure(result, tmp_path / "run", *phrases)
  assert nothing_written(tmp_path / "run")


@pytest.mark.parametrize("kind", ["a file", "inside a file", "not creatable", "read-only"])
def test_workdir_problems(tmp_path, kind, small_data):
  if kind == "a file":
    workdir = tmp_path / "file"
    workdir.write_text("x")
    phrases = ["is a file"]
  elif kind == "inside a file":
    (tmp_path / "file").write_text("x")
    workdir, phrases = tmp_path / "file" / "run", ["cannot be created"]
  elif kind == "not creatable":
    workdir, phrases = "/proc/dfqf-run", ["cannot be created"]
  else:
    if os.geteuid() == 0:
      pytest.skip("root writes into read-only folders")
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o555)
    phrases = ["is not writable"]
  result = run_in_process(GENERATOR_SMOKE, workdir, f"--config.data.dir={small_data}")
  assert_clean_failure(result, workdir, *phrases)


def test_an_unreachable_cloud_storage_is_one_line_within_seconds(monkeypatch, small_data):
  """No network (here: nothing listens where Cloud Storage is served): one line naming the
  fix, not gcsfs's minute of retries and an aiohttp traceback."""
  with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  started = time.time()
  result = run_in_process(GENERATOR_SMOKE, "gs://bucket/run", f"--config.data.dir={small_data}")
  assert time.time() - started < 15
  assert_clean_failure(result, None, "--workdir='gs://bucket/run' cannot be written",
                       f"cannot connect to 127.0.0.1:{port}", "check the network")


def test_evaluation_never_reuses_the_result_of_a_checkpoint_damaged_since(imported_teacher,
                                                                          small_data):
  """A cached top-1 stands only while its checkpoint's files are as they were: the teacher's
  arrays truncated after its evaluation are read again, and refused, not scored from cache."""
  run = lambda: run_in_process("configs/evaluate.py", imported_teacher,
                               f"--config.data.dir={small_data}")
  assert run().returncode == 0
  written = (imported_teacher / "results.json").read_bytes()
  assert json.loads(written)["teacher"]["checkpoint"] == "teacher/0"  # relative to the workdir
  arrays = max((p for p in (imported_teacher / "teacher" / "0").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  with open(arrays, "r+b") as f:
    f.truncate(arrays.stat().st_size // 2)
  assert_clean_failure(run(), imported_teacher, "the teacher checkpoint", "cannot be read",
                       "corrupted")
  assert (imported_teacher / "results.json").read_bytes() == written


def test_evaluation_is_redone_for_other_test_data_and_forgets_deleted_checkpoints(
    imported_teacher, tmp_path, small_data):
  run = lambda folder: run_in_process("configs/evaluate.py", imported_teacher,
                                f"--config.data.dir={folder}")
  assert run(small_data).returncode == 0
  first = json.loads((imported_teacher / "results.json").read_text())["teacher"]
  other = data_dir_with(tmp_path, small_data, "test", labels=np.roll(
      np.load(os.path.join(small_data, "cifar10_test.npz"))["labels"], 1))
  assert run(other).returncode == 0
  second = json.loads((imported_teacher / "results.json").read_text())["teacher"]
  assert second["test_data"] != first["test_data"]
  assert second["top1_percent"] < first["top1_percent"]
  results = json.loads((imported_teacher / "results.json").read_text())
  results["ptq_gone"] = {**second, "checkpoint": "ptq_gone/0"}
  (imported_teacher / "results.json").write_text(json.dumps(results))
  assert run(small_data).returncode == 0
  third = json.loads((imported_teacher / "results.json").read_text())
  assert set(third) == {"teacher"} and third["teacher"]["top1_percent"] == first["top1_percent"]


def test_the_pipeline_sets_each_shared_value_once():
  """Stage fields come from one place: the pipeline's (seed, data, depth, dtype) and, for
  fine-tuning's adversarial generator, the generator stage's loss weights and learning rate
  (the budget generator's lambda_bn is 10, not the reference 0.1)."""
  from configs import pipeline as pipeline_config
  from dfqf_jax.stages import pipeline
  config = pipeline_config.get_config("budget")
  config.seed = 3
  config.generator_stage.generator.learning_rate = 0.002
  stages = {name: sub for name, _, _, sub in pipeline.stage_configs(config)}
  finetune = stages["finetune_w4a4"]
  assert (finetune.lambda_is, finetune.lambda_bn, finetune.lambda_adv) == (
      config.generator_stage.lambda_is, 10.0, config.generator_stage.lambda_adv)
  assert finetune.generator_learning_rate == 0.002
  for sub in stages.values():
    assert (sub.seed, sub.data.validation_size, sub.model.depth) == (3, 5000, 20)
    assert sub.on_stale_upstream == "rebuild"


def test_bit_widths_in_capitals_name_the_same_student_once():
  """--config.bits=W4A4 is w4a4: one student and one PTQ starting point, not two models of
  one name (Orbax's StepAlreadyExistsError after minutes of training)."""
  from configs import pipeline as pipeline_config
  from dfqf_jax.stages import pipeline
  config = pipeline_config.get_config("smoke")
  config.bits = "W4A4"
  stages = {name: sub for name, _, _, sub in pipeline.stage_configs(config)}
  assert [n for n in stages if n.startswith("finetune_")] == ["finetune_w4a4"]
  assert stages["finetune_w4a4"].bits == "w4a4" and stages["ptq"].bits == "w4a4"
  pipeline.validate(config)
  config.ptq_stage.bits = "w4a4,W4A4"
  config.ptq_stage.calibration = "max,ft,max"
  ptq_config = [sub for name, _, _, sub in pipeline.stage_configs(config) if name == "ptq"][0]
  models = ptq.models_to_build(ptq_config, "/nonexistent", {},
                               validation.split_names(ptq_config.calibration))
  names = [name for *_, name, _ in models]
  assert len(names) == len(set(names))
  assert {(spec.weight_bits, spec.act_bits) for spec, *_ in models} == {(4, 4)}
  assert {method for _, method, _, _ in models} == {"max", "ft"}


def test_the_pipeline_fine_tunes_every_bit_width_under_every_protocol():
  """--config.bits=w4a4,w3a3 with finetune_stage.protocol=dfqf,standard: four students, and
  the PTQ table holds each one's starting point (its bits and protocol)."""
  from configs import pipeline as pipeline_config
  from dfqf_jax.stages import pipeline
  config = pipeline_config.get_config("smoke")
  config.bits = "w4a4,w3a3"
  config.finetune_stage.protocol = "dfqf,standard"
  stages = {name: sub for name, _, _, sub in pipeline.stage_configs(config)}
  students = {name: (sub.bits, sub.protocol) for name, sub in stages.items()
              if name.startswith("finetune_")}
  assert students == {"finetune_w4a4": ("w4a4", "dfqf"), "finetune_w3a3": ("w3a3", "dfqf"),
                      "finetune_w4a4_standard": ("w4a4", "standard"),
                      "finetune_w3a3_standard": ("w3a3", "standard")}
  assert stages["ptq"].bits == "w4a4,w3a3"  # smoke's PTQ bits w4a4, plus the students'
  assert stages["ptq"].protocol == "dfqf,standard"
  pipeline.validate(config)  # every stage's config is valid as split


def test_reference_frozen_bn_is_the_reference_schedule_with_the_students_bns_frozen():
  """The accelerator's second recipe: the budget's fine-tuning deviation (students' BNs
  frozen at the teacher's statistics) at the reference schedule, nothing else changed."""
  from configs import pipeline as pipeline_config
  from dfqf_jax.stages import pipeline
  reference = pipeline_config.get_config("reference").to_dict()
  frozen = pipeline_config.get_config("reference_frozen_bn").to_dict()
  assert frozen.pop("schedule") == "reference_frozen_bn"
  assert frozen["finetune_stage"].pop("student_bn_train") is False
  assert reference["finetune_stage"].pop("student_bn_train") is True
  reference.pop("schedule")
  assert frozen == reference
  pipeline.validate(pipeline_config.get_config("reference_frozen_bn"))


def test_a_library_error_is_named_by_its_root_cause_in_one_line():
  try:
    try:
      try:
        raise ValueError("OUT_OF_RANGE: byte range 0-4096 is not valid\n(tensorstore detail)")
      except ValueError as e:
        raise RuntimeError("") from e  # says nothing
    except RuntimeError as e:
      raise Exception("Encountered error while reading array index: ...") from e
  except Exception as e:
    assert errors.brief(e) == "ValueError: OUT_OF_RANGE: byte range 0-4096 is not valid"
  assert errors.brief(KeyError()) == "KeyError"
