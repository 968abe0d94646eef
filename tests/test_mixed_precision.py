"""config.compute_dtype=bfloat16: bfloat16 compute, float32 parameters, statistics and logits."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli import run_in_process
from conftest import PUBLISHED_TOP1, TEACHER_WEIGHTS, copy_workdir
from dfqf_jax import checkpoints, classifiers, convert, data, parallel
from dfqf_jax.models.generator import Generator
from dfqf_jax.models.resnet import CifarResNet


def test_bfloat16_models_keep_float32_parameters_and_outputs():
  for model, x in ((CifarResNet(20, dtype=jnp.bfloat16), jnp.zeros((2, 32, 32, 3))),
                   (Generator(16, dtype=jnp.bfloat16), jnp.zeros((2, 16)))):
    variables = model.init(jax.random.key(0), x)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert model.apply(variables, x, mutable=["batch_stats"])[0].dtype == jnp.float32


def test_bfloat16_compute_keeps_the_imported_teacher_accuracy(shared_data):
  """Measured: 91.73% in both dtypes on the 10,000 test images. The float32 number is
  test_models.py's (the published 91.73%, pinned there); only bfloat16 is evaluated here."""
  variables = convert.torch_resnet_to_flax(convert.load_state_dict_npz(TEACHER_WEIGHTS), 20, 10)
  test = data.load_split("cifar10", "test", shared_data)
  top1 = classifiers.top1_percent(CifarResNet(20, dtype=jnp.bfloat16), variables, test,
                                  data.IMAGENET_MEAN, data.IMAGENET_STD, parallel.make_mesh())
  assert top1 == pytest.approx(PUBLISHED_TOP1, abs=0.3)


def test_bfloat16_stage_1_trains_and_checkpoints_float32(tmp_path, small_data, imported_workdir):
  tmp_path = copy_workdir(imported_workdir, tmp_path / "run")
  result = run_in_process("configs/generator.py:smoke", tmp_path,
                          f"--config.data.dir={small_data}", "--config.compute_dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  state, _, step = checkpoints.load_product(str(tmp_path / "generator"), "generator")
  assert step == 4
  assert {np.asarray(x).dtype for x in jax.tree.leaves(state)} <= {
      np.dtype(np.float32), np.dtype(np.int32)}
  with open(tmp_path / "generator" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss_g"] for line in f if "loss_g" in line]
  assert losses and np.all(np.isfinite(losses))
