"""TFDS for real: a CIFAR-10 prepared by TFDS's own builder (from the small .npz splits,
through its manual-download path: dfqf_jax.tools.prepare_tfds) and read with
--config.data.dir=tfds through tfds.data_source, without TensorFlow, gives the imported
teacher the top-1 the .npz files give it.

Preparing needs TensorFlow, which the project's environment does not hold (with TensorFlow
installed, etils would serve gs:// through TensorFlow's gfile instead of gcsfs): it runs in
the Python of $DFQF_TFDS_PYTHON or .venv-tfds/ (CI makes it: .ci/run, with
tests/requirements-tfds.txt); without one these tests are skipped. The evaluation itself
runs in this process, without TensorFlow."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from cli import REPO, run_in_process
from conftest import TEACHER_WEIGHTS, prepared_once

TFDS_PYTHON = (os.environ.get("DFQF_TFDS_PYTHON") or
               os.path.join(REPO, ".venv-tfds", "bin", "python"))
pytestmark = pytest.mark.skipif(
    not os.path.exists(TFDS_PYTHON),
    reason="preparing a TFDS dataset needs a Python with TensorFlow: .venv-tfds/ (see .ci/run) "
           "or $DFQF_TFDS_PYTHON")


@pytest.fixture(scope="session")
def tfds_data_dir(small_data, tmp_path_factory):
  """A TFDS data dir holding cifar10 3.0.2 (array_record) prepared from SMALL_DATA."""
  def build(folder):
    result = subprocess.run([TFDS_PYTHON, "-m", "dfqf_jax.tools.prepare_tfds",
                             f"--npz-dir={small_data}", f"--data-dir={folder}"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

  return prepared_once(tmp_path_factory, "tfds", build)


def test_the_teacher_scores_on_a_tfds_dataset_what_it_scores_on_the_npz_files(
    tfds_data_dir, small_data, tmp_path):
  tfds = ["--config.data.dir=tfds", f"--config.data.tfds.data_dir={tfds_data_dir}"]
  imported = run_in_process("configs/import_teacher.py", tmp_path / "tfds",
                            f"--config.weights={TEACHER_WEIGHTS}", *tfds)
  assert imported.returncode == 0, imported.stderr[-2000:]
  shutil.copytree(tmp_path / "tfds" / "teacher", tmp_path / "npz" / "teacher")  # the same one
  for folder, data in (("tfds", tfds), ("npz", [f"--config.data.dir={small_data}"])):
    evaluated = run_in_process("configs/evaluate.py", tmp_path / folder, *data)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  from_tfds, from_npz = (json.loads((tmp_path / f / "results.json").read_text())["teacher"]
                         for f in ("tfds", "npz"))
  assert from_tfds["top1_percent"] == from_npz["top1_percent"] > 85  # 91.73% on 250 images
  assert from_tfds["test_data"] != from_npz["test_data"]  # TFDS shuffled them when preparing
  assert "tensorflow" not in sys.modules  # read through array_record, without TensorFlow


def test_a_tfds_dataset_of_other_classes_is_refused_before_any_work(tfds_data_dir, tmp_path):
  result = run_in_process("configs/evaluate.py", tmp_path, "--config.data.name=cifar100",
                          "--config.data.dir=tfds", "--config.data.tfds.dataset=cifar10",
                          f"--config.data.tfds.data_dir={tfds_data_dir}")
  assert result.returncode == 2
  assert "TFDS 'cifar10' has 10 classes but data.name='cifar100' has 100" in result.stderr
