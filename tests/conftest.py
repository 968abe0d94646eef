"""Tests run on CPU with 8 forced host devices (set before jax is imported)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test process (and every main.py it starts) shares compiled programs: the suite runs
# the same stages many times, and compilation dominates a smoke-scale run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax"))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import pytest  # noqa: E402

# In-process tests run tiny programs once: compiling them with XLA's full optimization costs
# more than it saves (as flax's own tests do). Only this process; main.py subprocesses keep it.
jax.config.update("jax_disable_most_optimizations", True)

SHARED_DATA = os.environ.get("DFQF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
TEACHER_WEIGHTS = os.path.join(SHARED_DATA, "resnet20-12fca82f_weights.npz")
# A run given no data.dir reads the download cache: the shared files, never the network.
os.environ.setdefault("DFQF_DATA_DIR", SHARED_DATA)


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isfile(os.path.join(SHARED_DATA, "cifar10_test.npz")):
    pytest.skip("../shared/data is not present")
  return SHARED_DATA


SMALL_DATA = os.path.join(REPO, ".pytest_cache", "small_data")


def write_small_split(src: str, dst: str, size: int, seed: int = 0) -> None:
  """A random `size`-image subset of a CIFAR .npz split (the shared files are class-major)."""
  import numpy as np
  with np.load(src) as f:
    images, labels = f["images"], f["labels"]
  keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:size])
  np.savez(dst + ".tmp.npz", images=images[keep], labels=labels[keep])
  os.replace(dst + ".tmp.npz", dst)


@pytest.fixture(scope="session")
def small_data(shared_data):
  """SMALL_DATA: 500 test and 1,000 training images of ../shared/data, for subprocess runs
  whose numbers do not matter (evaluating the full test split dominates a smoke run)."""
  os.makedirs(SMALL_DATA, exist_ok=True)
  for split, size in (("test", 500), ("train", 1000)):
    path = os.path.join(SMALL_DATA, f"cifar10_{split}.npz")
    if not os.path.exists(path):
      write_small_split(os.path.join(shared_data, f"cifar10_{split}.npz"), path, size)
  return SMALL_DATA


def copy_workdir(source, destination):
  """A fresh copy of a prepared workdir (session fixtures are shared: never write to them)."""
  import shutil
  shutil.copytree(source, destination)
  return destination


@pytest.fixture(scope="session")
def imported_workdir(shared_data, tmp_path_factory):
  """A workdir holding the imported 91.73% teacher, made once per session: copy it
  (copy_workdir) before running anything in it."""
  from cli import run_in_process
  workdir = tmp_path_factory.mktemp("imported") / "run"
  result = run_in_process("configs/import_teacher.py", workdir,
                          f"--config.weights={TEACHER_WEIGHTS}")
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


@pytest.fixture(scope="session")
def generator_workdir(imported_workdir, small_data, tmp_path_factory):
  """imported_workdir plus the smoke stage-1 generator (4 iterations), made once per
  session: copy it before running anything in it."""
  from cli import run_in_process
  workdir = copy_workdir(imported_workdir, tmp_path_factory.mktemp("generator") / "run")
  result = run_in_process("configs/generator.py:smoke", workdir, f"--config.data.dir={small_data}",
                          "--config.eval_every_epochs=100")
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir
