"""Data parallelism: 1 device and 8 devices give the same steps for the same global batch."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cli import REPO
from configs import finetune as finetune_config
from configs import teacher as teacher_config
from dfqf_jax import data, dfkd, parallel, training
from dfqf_jax.models.generator import Generator
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import generator as stage1
from dfqf_jax.stages import teacher as stage0


ONE, ALL = tuple(jax.devices()[:1]), tuple(jax.devices())  # runs are cached by these keys
# Randomly initialized ResNet-8s (one block per stage): what is compared is how a step is
# split over devices, which does not depend on the depth; a third of ResNet-20 to compile.
DEPTH = 8
pytestmark = pytest.mark.xdist_group("cached_runs")  # one worker computes each cached run


def initial_variables(module, seed, example):
  variables = module.init(jax.random.key(seed), example)
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def run_steps(step, state, teacher_vars, num_steps, first_key):
  """num_steps jitted steps, step i with key first_key + i; returns (state, metrics list)."""
  history = []
  for i in range(num_steps):
    state, metrics = step(state, jax.random.key(first_key + i), teacher_vars)
    history.append(jax.device_get(metrics))
  return state, history


def assert_same_update(a, b, start, tol=1e-2):
  """|a - b| / |a - start| over the whole tree: the two runs moved the same way.

  The tolerance is float32 round-off, which these freshly initialized networks amplify:
  on one device, merely permuting the batch changes the gradient by ~2e-4 (relative) and
  the parameters after 3 steps by ~4e-3; reduction order is all that differs across device
  counts. Batch-norm statistics or gradients computed per device instead of over the global
  batch give errors of order 1.
  """
  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
  diff = sum(np.sum((x - y) ** 2) for x, y in zip(leaves(a), leaves(b)))
  moved = sum(np.sum((x - y) ** 2) for x, y in zip(leaves(a), leaves(start)))
  assert np.sqrt(diff / moved) < tol, np.sqrt(diff / moved)


@functools.lru_cache
def run_teacher_steps(devices, num_steps=3, batch_size=32):
  mesh = parallel.make_mesh(devices)
  rng = np.random.default_rng(0)
  split = data.Split(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
                     rng.integers(0, 10, 64).astype(np.int32))
  config = teacher_config.get_config("smoke")
  config.learning_rate, config.lr_milestones = 0.01, ()
  config.model.depth = DEPTH
  state, step = stage0.create_state_and_step(config, steps_per_epoch=2, mesh=mesh)
  metrics = None
  for i in range(num_steps):
    batch = data.train_batch(split, batch_size, 0, i, slice(None))
    state, metrics = step(state, parallel.global_batch(mesh, batch))
  return state, metrics


def test_teacher_steps_match_on_1_and_8_devices():
  assert jax.device_count() == 8
  start, _ = run_teacher_steps(ONE, num_steps=0)
  one, m1 = run_teacher_steps(ONE)
  eight, m8 = run_teacher_steps(ALL)
  assert len(jax.tree.leaves(eight.params)[0].sharding.device_set) == 8
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  assert_same_update(one.params, eight.params, start.params)
  assert_same_update(one.batch_stats, eight.batch_stats, start.batch_stats, tol=1e-4)


@functools.lru_cache
def run_generator_steps(devices, num_steps=2, batch_size=16, single_pass=True):
  mesh = parallel.make_mesh(devices)
  teacher = CifarResNet(DEPTH)
  teacher_vars = parallel.replicate(
      mesh, initial_variables(teacher, 3, jnp.zeros((1, 32, 32, 3))))
  generator, student = Generator(latent_dim=24, width=16), CifarResNet(DEPTH)
  # SGD for G: Adam turns round-off in near-zero gradients into full-size steps, which
  # would hide what is compared here (the losses below are compared under Adam's inputs).
  g_tx, s_tx = optax.sgd(0.01), training.sgd(0.1)
  hp = dfkd.Hyper(batch_size, 24, 40.0, 0.1, 5.0, single_pass)
  models = dfkd.Models(generator, teacher, student)
  state = jax.jit(lambda k: stage1.initial_state(models, g_tx, s_tx, hp, k),
                  out_shardings=parallel.replicated(mesh))(jax.random.key(0))
  step = jax.jit(functools.partial(dfkd.train_step, mesh=mesh))
  return run_steps(step, state, teacher_vars, num_steps, first_key=10)


def test_generator_steps_match_on_1_and_8_devices():
  """One stage-1 iteration: its losses and both networks' updates.

  Only one: the freshly initialized student's gradient is ill-conditioned (its first
  layer's weight gradient on 1 vs 8 devices differed by 2e-6 relative for one batch of
  generated images, and by 4e-3 for the average of that batch with one within 1e-6 of it),
  so the second iteration's losses differed across device counts by up to 7e-4 over five
  latent seeds (up to 1.6e-4 before the generator's upsampling convolutions were fused). The
  first iteration's agree to 1e-6.
  """
  start, _ = run_generator_steps(ONE, num_steps=0)
  one, h1 = run_generator_steps(ONE, num_steps=1)
  eight, h8 = run_generator_steps(ALL, num_steps=1)
  for a, b in zip(h1, h8):
    for key in stage1.LOSS_KEYS:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  assert_same_update(one.generator, eight.generator, start.generator)
  assert_same_update(one.student, eight.student, start.student)


def test_single_student_pass_equals_two_passes():
  start, _ = run_generator_steps(ONE, num_steps=0)
  single, _ = run_generator_steps(ONE)  # single pass is the default (and cached)
  double, _ = run_generator_steps(ONE, single_pass=False)
  assert_same_update(single.generator, double.generator, start.generator)
  assert_same_update(single.student["params"], double.student["params"],
                     start.student["params"])


@functools.lru_cache
def run_finetune_steps(devices, num_steps=2, batch_size=16):
  from dfqf_jax import calibration
  from dfqf_jax import quant as q
  from dfqf_jax.stages import finetune
  mesh = parallel.make_mesh(devices)
  teacher = CifarResNet(DEPTH)
  teacher_vars = initial_variables(teacher, 3, jnp.zeros((1, 32, 32, 3)))
  spec = q.QuantSpec(4, 4, "dfqf")
  student, variables = calibration.quantized_student(teacher_vars, DEPTH, 10, spec)
  generator = Generator(latent_dim=24, width=16)
  g_vars = initial_variables(generator, 4, jnp.zeros((2, 24)))
  x = [generator.apply(g_vars, jax.random.normal(jax.random.key(5), (16, 24)),
                       mutable=["batch_stats"])[0]]
  summaries = calibration.summarize(teacher_vars, DEPTH, 10, x, ["ft"])
  variables = calibration.calibrate(variables, spec, "ft", summaries)
  config = finetune_config.get_config("w4a4")
  config.batch_size, config.learning_rate, config.lr_milestones = batch_size, 0.01, ()
  config.clip_learning_rate = 1e-3
  state, step = finetune.create_state_and_step(config, teacher, (generator, g_vars),
                                               (student, variables), mesh)
  teacher_vars = parallel.replicate(mesh, teacher_vars)
  return run_steps(step, state, teacher_vars, num_steps, first_key=20)


def test_finetune_steps_match_on_1_and_8_devices():
  """One fine-tuning step (fresh generated images, KD, clip and weight updates).

  Only one: after an update, float round-off in the weights flips the rounding of the few
  weights that sit at a 4-bit grid boundary, and the fake-quantized forward then jumps by
  a grid step; that happens equally between two 1-device runs fed permuted batches.
  """
  start, _ = run_finetune_steps(ONE, num_steps=0)
  one, h1 = run_finetune_steps(ONE, num_steps=1)
  eight, h8 = run_finetune_steps(ALL, num_steps=1)
  for a, b in zip(h1, h8):
    np.testing.assert_allclose(a["loss_kd"], b["loss_kd"], rtol=1e-4)
  assert_same_update(one.student, eight.student, start.student)


@pytest.mark.parametrize("environment, expected", [
    ({}, min(8, 1 << (len(os.sched_getaffinity(0)).bit_length() - 1))),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
    ({"JAX_NUM_CPU_DEVICES": "1"}, 1)])
def test_one_cpu_device_per_core_unless_the_count_is_set(environment, expected):
  """parallel.use_cpu_cores(): a power of two of the usable cores (at most 8) by default."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", **environment)
  result = subprocess.run(
      [sys.executable, "-c", "import jax; from dfqf_jax import parallel; "
       "parallel.use_cpu_cores(); print(jax.device_count())"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert int(result.stdout.split()[-1]) == expected


@pytest.mark.parametrize("batch_size", [8, 1000])
def test_top1_over_8_devices_counts_each_image_once(batch_size):
  """13 images (not a multiple of the 8 devices) in batches of 8 (the last one padded with
  copies of the last image, masked), or as one batch of 16 (a split smaller than the batch
  size): 8 of the 13 labels are the model's own predictions, the last image's among them,
  so a padding copy counted, or an image dropped, changes the result."""
  from dfqf_jax import classifiers
  model = CifarResNet(DEPTH)
  variables = initial_variables(model, 0, jnp.zeros((1, 32, 32, 3)))
  images = np.random.default_rng(0).integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  logits = model.apply(variables, data.normalize(images, mean, std), train=False)
  labels = np.array(np.argmax(logits, -1), np.int32)
  labels[:5] = (labels[:5] + 1) % 10
  split = data.Split(images, labels)
  got = classifiers.top1_percent(model, variables, split, mean, std, parallel.make_mesh(ALL),
                                 batch_size)
  assert got == 100 * 8 / 13
