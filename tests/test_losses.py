"""Each DFQF loss against a NumPy evaluation of the formulas in METHOD.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfqf_jax import losses as L
from dfqf_jax.models.layers import BN_INPUT_STATS, BatchNorm


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_entropy(p):
  return -(p * np.log(p)).sum(-1)


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return rng.normal(size=(16, 10)) * 3, rng.normal(size=(16, 10)) * 3


def test_kd_loss_is_batch_mean_of_kl_teacher_student(logits):
  t, s = logits
  p_t, p_s = np_softmax(t), np_softmax(s)
  expected = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
  np.testing.assert_allclose(L.kd_loss(t, s), expected, rtol=1e-5)
  assert abs(float(L.kd_loss(t, t))) < 1e-6


def test_inception_score_loss(logits):
  t, _ = logits
  p = np_softmax(t)
  conditional = np_entropy(p).mean()
  marginal = np_entropy(p.mean(0))
  loss, h_cond, h_marg = L.inception_score_loss(t, lambda_is=40.0)
  np.testing.assert_allclose(h_cond, conditional, rtol=1e-5)
  np.testing.assert_allclose(h_marg, marginal, rtol=1e-5)
  np.testing.assert_allclose(loss, conditional - 40.0 * marginal, rtol=1e-5)


def np_bn_loss(inputs, running):
  total = 0.0
  for x, (rm, rv) in zip(inputs, running):
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mu = flat.mean(0)
    s2 = flat.var(0, ddof=1)  # unbiased
    s2 = np.where(s2 == 0, 1e-8, s2)
    total += np.mean(s2 - rv * np.log(s2) + (mu - rm) ** 2)
  return total


def test_bn_statistics_loss_uses_unbiased_variance_and_floor():
  rng = np.random.default_rng(1)
  x1 = rng.normal(2.0, 3.0, size=(4, 5, 5, 6)).astype(np.float32)
  x1[..., 0] = 1.5  # a constant channel: s2 == 0 -> 1e-8
  x2 = rng.normal(size=(4, 3, 3, 8)).astype(np.float32)
  running = [(rng.normal(size=6), rng.uniform(0.5, 2, 6)),
             (rng.normal(size=8), rng.uniform(0.5, 2, 8))]

  def apply(x, name, rm, rv):
    bn = BatchNorm(use_running_average=True, name=name)
    variables = {"params": {"scale": jnp.ones(x.shape[-1]), "bias": jnp.zeros(x.shape[-1])},
                 "batch_stats": {"mean": jnp.asarray(rm, jnp.float32),
                                 "var": jnp.asarray(rv, jnp.float32)}}
    _, recorded = bn.apply(variables, x, mutable=[BN_INPUT_STATS])
    return recorded[BN_INPUT_STATS], variables["batch_stats"]

  stats1, bs1 = apply(x1, "a", *running[0])
  stats2, bs2 = apply(x2, "b", *running[1])
  got = L.bn_statistics_loss({"a": stats1, "b": stats2}, {"a": bs1, "b": bs2})
  expected = np_bn_loss([x1, x2], [(np.float32(rm), np.float32(rv)) for rm, rv in running])
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # The floor matters: the constant channel contributes -rv * log(1e-8) / 6.
  assert float(got) > float(running[0][1][0] * -np.log(1e-8) / 6)


def test_batchnorm_matches_pytorch_semantics():
  """Train mode: biased variance to normalize, unbiased into the running variance (0.9/0.1)."""
  rng = np.random.default_rng(2)
  x = rng.normal(1.0, 2.0, size=(8, 4, 4, 3)).astype(np.float32)
  bn = BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  flat = x.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(y.reshape(-1, 3), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)


def test_gradient_signs_generator_ascends_adversarial_student_descends():
  """G's loss has -lambda_adv * KL: a gradient step on G increases KL; a step on S lowers it."""
  rng = np.random.default_rng(3)
  t = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
  s = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
  lambda_adv, lr = 5.0, 1e-2
  generator_objective = lambda t_: -lambda_adv * L.kd_loss(t_, s)  # the L_adv part of L_G
  t_after = t - lr * jax.grad(generator_objective)(t)
  assert L.kd_loss(t_after, s) > L.kd_loss(t, s)
  s_after = s - lr * jax.grad(lambda s_: L.kd_loss(t, s_))(s)
  assert L.kd_loss(t, s_after) < L.kd_loss(t, s)


def test_entropy_handles_zero_probabilities():
  np.testing.assert_allclose(L.entropy(jnp.array([0.5, 0.5, 0.0])), np.log(2), rtol=1e-6)


@pytest.mark.parametrize("depth", [20, 56])
def test_the_bn_loss_sees_every_bn_layer_of_the_teacher(depth):
  """One recorded (mean, var) per BN layer: depth - 1 (every conv has one), the same layers
  as the running statistics the loss compares them with."""
  from flax import traverse_util

  from dfqf_jax.models.resnet import CifarResNet
  model, x = CifarResNet(depth), jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  _, recorded = jax.eval_shape(lambda v: model.apply(v, x, train=False,
                                                     mutable=[BN_INPUT_STATS]), variables)
  layers = lambda tree: {path[:-1] for path in traverse_util.flatten_dict(tree)}
  assert layers(recorded[BN_INPUT_STATS]) == layers(variables["batch_stats"])
  assert len(layers(variables["batch_stats"])) == depth - 1
