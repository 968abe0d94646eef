"""Stage 2's state: the generator is carried only as far as the fine-tuning needs it; the
student's BN statistics move only when configured to."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.finetune
import configs.generator
from cli import run_in_process
from conftest import SMALL_TEACHER_ARGS, copy_workdir
from dfqf_jax import calibration, checkpoints, image_sources, parallel, training
from dfqf_jax import quant as q
from dfqf_jax.models.generator import Generator
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import finetune
from dfqf_jax.validation import ConfigError


def test_real_data_qat_keeps_no_generator(tmp_path, small_data, generator_workdir):
  """(On generated images the student keeps its generator and, unless it trains alongside,
  no optimizer state for it: tests/test_lineage.py, on the smoke pipeline's student.)"""
  workdir = copy_workdir(generator_workdir, tmp_path / "run")
  result = run_in_process("configs/finetune.py:w4a4,smoke", workdir, *SMALL_TEACHER_ARGS,
                          f"--config.data.dir={small_data}", "--config.data_source=real")
  assert result.returncode == 0, result.stderr[-3000:]
  state, _, step = checkpoints.load_product(str(workdir / "qat_real_w4a4"), "qat_real_w4a4")
  assert step == 2
  assert not jax.tree.leaves(state.get("generator", {}))
  assert not jax.tree.leaves(state.get("g_opt_state", {}))
  with open(workdir / "qat_real_w4a4" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss_kd"] for line in f if "loss_kd" in line]
  assert losses and np.all(np.isfinite(losses))


TRAINED_WITH = {"lambda_is": 40.0, "lambda_bn": 10.0, "lambda_adv": 5.0,
                "generator_learning_rate": 0.005}


def test_the_adversarial_generator_keeps_the_loss_weights_it_was_trained_with(generator_workdir):
  """Unset, fine-tuning's loss weights are the generator's own (recorded in its checkpoint);
  a value in the config overrides them."""
  _, _, g_meta = image_sources.load_generator(str(generator_workdir))
  smoke = configs.generator.get_config("smoke")
  assert g_meta["loss_weights"] == {"lambda_is": smoke.lambda_is, "lambda_bn": smoke.lambda_bn,
                                    "lambda_adv": smoke.lambda_adv,
                                    "generator_learning_rate": smoke.generator.learning_rate}
  config = configs.finetune.get_config("w4a4,smoke")
  config.adversarial_generator, config.lambda_adv = True, 2.0
  resolved = finetune.with_generator_loss_weights(config, {"loss_weights": TRAINED_WITH})
  assert {f: resolved[f] for f in finetune.ADVERSARIAL_FIELDS} == {**TRAINED_WITH,
                                                                  "lambda_adv": 2.0}
  assert config.lambda_bn is None  # the given config is left as it was


def test_a_generator_that_records_no_loss_weights_needs_them_given():
  config = configs.finetune.get_config("w4a4,smoke")
  config.adversarial_generator, config.lambda_is = True, 40.0
  with pytest.raises(ConfigError, match="does not record lambda_bn, lambda_adv, "
                                        "generator_learning_rate .* pass the values"):
    finetune.with_generator_loss_weights(config, {"latent_dim": 1000})


@pytest.mark.parametrize("adversarial_generator,student_bn_train",
                         [(False, False), (True, False), (True, True)])
def test_the_student_bns_are_frozen_or_re_estimated_as_configured_in_either_step(
    adversarial_generator, student_bn_train):
  """student_bn_train=False keeps the teacher's running statistics in the student, also when
  the generator keeps training adversarially (stage 1's iteration on the fine-tuning state)."""
  config = configs.finetune.get_config("w4a4,smoke")
  config.adversarial_generator, config.student_bn_train = adversarial_generator, student_bn_train
  config = finetune.with_generator_loss_weights(config, {"loss_weights": TRAINED_WITH})
  teacher, generator = CifarResNet(8), Generator(latent_dim=16, width=16)
  t_init = teacher.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  teacher_vars = {"params": t_init["params"], "batch_stats": t_init["batch_stats"]}
  g_vars = generator.init(jax.random.key(1), jnp.zeros((2, 16)))
  student = calibration.quantized_student(teacher_vars, 8, 10, q.QuantSpec(4, 4, "dfqf"))
  mesh = parallel.make_mesh()
  state, step = finetune.create_state_and_step(config, teacher, (generator, g_vars), student,
                                               mesh)
  before = jax.device_get(state.student)  # the step donates its state
  after, _ = step(state, jax.random.key(2), parallel.replicate(mesh, teacher_vars))
  after = jax.device_get(after.student)
  stats_unchanged = jax.tree.all(jax.tree.map(np.array_equal, before["batch_stats"],
                                              after["batch_stats"]))
  assert stats_unchanged == (not student_bn_train)
  assert not jax.tree.all(jax.tree.map(np.array_equal, before["params"], after["params"]))


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_weights_optimizer_is_pytorchs_sgd_with_or_without_nesterov(nesterov, monkeypatch):
  """training.sgd against PyTorch's SGD update written out in NumPy (coupled weight decay,
  momentum buffer b = m b + g, step g + m b with Nesterov, else b), three steps."""
  lr, m, wd = 0.1, 0.9, 5e-4
  p, grads = np.array([1.0, -2.0, 0.5]), [np.array([0.3, -0.1, 0.2]) * (i + 1) for i in range(3)]
  expected, buffer = p.copy(), np.zeros(3)
  for g in grads:
    g = g + wd * expected
    buffer = m * buffer + g
    expected = expected - lr * (g + m * buffer if nesterov else buffer)
  tx = training.sgd(lr, m, wd, nesterov)
  params = jnp.asarray(p, jnp.float32)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = params + updates
  np.testing.assert_allclose(params, expected, rtol=1e-6)
  # Fine-tuning builds it from config.nesterov (default False: DFQF's reference; GDFQ's True).
  config = configs.finetune.get_config("w4a4,smoke")
  assert config.nesterov is False
  config.nesterov = nesterov
  built = []

  def recorded_sgd(learning_rate, momentum, weight_decay, nesterov):
    built.append(nesterov)
    return optax.identity()

  monkeypatch.setattr(training, "sgd", recorded_sgd)
  finetune.student_optimizer(config, 10, q.QuantSpec(4, 4, "dfqf"))
  assert built == [nesterov]
