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

import pytest  # noqa: E402

SHARED_DATA = os.environ.get("DFQF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
TEACHER_WEIGHTS = os.path.join(SHARED_DATA, "resnet20-12fca82f_weights.npz")


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
