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
