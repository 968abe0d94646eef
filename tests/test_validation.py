"""Bad input: one clear error naming the problem and the fix, exit code 2, nothing written."""
import os

import pytest

from cli import run_main
from conftest import SHARED_DATA, TEACHER_WEIGHTS

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
def imported_teacher(tmp_path_factory, shared_data):
  workdir = tmp_path_factory.mktemp("imported")
  result = run_main("configs/import_teacher.py", workdir, f"--config.weights={TEACHER_WEIGHTS}")
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


CASES = {
    "unknown dataset": (TEACHER_SMOKE, ["--config.data.name=mnist"], 1,
                        ["config.data.name='mnist'", "cifar10"]),
    "data dir without files": (TEACHER_SMOKE, ["--config.data.dir=/nonexistent"], 1,
                               ["no cifar10_train.npz", "DFQF_DATA_DIR"]),
    "batch not divisible by devices": (TEACHER_SMOKE, ["--config.batch_size=12"], 8,
                                       ["config.batch_size=12", "multiple of the 8 devices"]),
    "non-positive learning rate": (TEACHER_SMOKE, ["--config.learning_rate=0"], 1,
                                   ["config.learning_rate=0"]),
    "unknown depth": (TEACHER_SMOKE, ["--config.model.depth=18"], 1, ["config.model.depth=18"]),
    "unknown compute dtype": (TEACHER_SMOKE, ["--config.compute_dtype=float16"], 1,
                              ["config.compute_dtype='float16'", "bfloat16"]),
    "weights of another depth": ("configs/import_teacher.py",
                                 [f"--config.weights={TEACHER_WEIGHTS}",
                                  "--config.model.depth=32"], 1,
                                 ["ResNet-32", "set model.depth"]),
    "missing weights file": ("configs/import_teacher.py", ["--config.weights=/no/such.npz"], 1,
                             ["is not a file"]),
    "zero loss weight": (GENERATOR_SMOKE, ["--config.lambda_bn=0"], 1,
                         ["config.lambda_bn=0", "> 0"]),
    "negative loss weight": (GENERATOR_SMOKE, ["--config.lambda_adv=-5"], 1,
                             ["config.lambda_adv=-5"]),
    "missing teacher checkpoint": (GENERATOR_SMOKE, [], 1,
                                   ["no teacher checkpoint", "run the teacher stage"]),
    "bits above 8": ("configs/ptq.py:w9a4", [], 1, ["config.bits='w9a4'", "32"]),
    "bits below 2": ("configs/finetune.py:w1a1", [], 1, ["config.bits='w1a1'"]),
    "malformed bits": ("configs/ptq.py:4bit", [], 1, ["config.bits='4bit'", "w<bits>a<bits>"]),
    "unknown calibration": (PTQ, ["--config.calibration=percentile"], 1,
                            ["config.calibration='percentile'", "mse"]),
    "unknown protocol": (PTQ, ["--config.protocol=lsq"], 1, ["config.protocol='lsq'"]),
    "unknown calibration data": (PTQ, ["--config.calibration_data=imagenet"], 1,
                                 ["config.calibration_data='imagenet'"]),
    "several students in one finetune": ("configs/finetune.py:w4a4,w8a8", [], 1,
                                         ["finetune trains one student"]),
    "pipeline with a bad stage field": ("configs/pipeline.py:smoke",
                                        ["--config.finetune_stage.learning_rate=-1"], 1,
                                        ["config.learning_rate=-1"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, shared_data):
  config, overrides, devices, phrases = CASES[case]
  workdir = tmp_path / "run"
  if "--config.data.dir" not in " ".join(overrides):
    overrides = [f"--config.data.dir={SHARED_DATA}", *overrides]
  result = run_main(config, workdir, *overrides, devices=devices)
  assert_clean_failure(result, workdir, *phrases)
  assert nothing_written(workdir)


def test_latent_size_mismatch_with_generator_checkpoint(imported_teacher, shared_data):
  args = [f"--config.data.dir={SHARED_DATA}", "--config.num_epochs=1",
          "--config.iters_per_epoch=1", "--config.eval_every_epochs=1"]
  assert run_main(GENERATOR_SMOKE, imported_teacher, *args).returncode == 0
  before = sorted(os.listdir(imported_teacher / "generator"))
  result = run_main(GENERATOR_SMOKE, imported_teacher, *args, "--config.generator.latent_dim=64")
  assert_clean_failure(result, imported_teacher, "latent_dim=32", "latent_dim=64")
  assert sorted(os.listdir(imported_teacher / "generator")) == before


def test_teacher_of_another_depth_is_rejected_by_stage_2(imported_teacher, shared_data):
  result = run_main(PTQ, imported_teacher, f"--config.data.dir={SHARED_DATA}",
                    "--config.model.depth=32", "--config.calibration_data=real")
  assert_clean_failure(result, imported_teacher, "ResNet-20", "config.model.depth=32")
  assert sorted(os.listdir(imported_teacher)) == ["teacher"]
