"""Tests run on CPU with 8 forced host devices (set before jax is imported)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pytest  # noqa: E402

SHARED_DATA = os.environ.get("DFQF_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
TEACHER_WEIGHTS = os.path.join(SHARED_DATA, "resnet20-12fca82f_weights.npz")


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isfile(os.path.join(SHARED_DATA, "cifar10_test.npz")):
    pytest.skip("../shared/data is not present")
  return SHARED_DATA


def write_small_split(src: str, dst: str, size: int, seed: int = 0) -> None:
  """A random `size`-image subset of a CIFAR .npz split (the shared files are class-major)."""
  import numpy as np
  with np.load(src) as f:
    images, labels = f["images"], f["labels"]
  keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:size])
  np.savez(dst, images=images[keep], labels=labels[keep])


@pytest.fixture(scope="session")
def small_data(shared_data, tmp_path_factory):
  """A data folder with 500 test and 1,000 training images, for subprocess runs whose
  numbers do not matter (evaluation of the full test split dominates a smoke run)."""
  folder = tmp_path_factory.mktemp("small_data")
  write_small_split(os.path.join(shared_data, "cifar10_test.npz"),
                    str(folder / "cifar10_test.npz"), 500)
  write_small_split(os.path.join(shared_data, "cifar10_train.npz"),
                    str(folder / "cifar10_train.npz"), 1000)
  return str(folder)
