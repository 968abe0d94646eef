"""ZeroQ and GDFQ as image sources: their losses against NumPy, and what their optimization
does with the imported teacher (in-process, a few iterations)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import gdfq as gdfq_config
from configs import zeroq as zeroq_config
from dfqf_jax import baselines as B
from dfqf_jax import classifiers, dfkd
from dfqf_jax.models.layers import BN_INPUT_STATS
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import gdfq, zeroq


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def bn_layers():
  """Two BN inputs (NHWC) with running statistics, and the images they came from."""
  rng = np.random.default_rng(0)
  images = rng.normal(0.3, 1.5, (3, 4, 4, 3)).astype(np.float32)
  layers = [(rng.normal(1.0, 2.0, (3, 4, 4, 5)).astype(np.float32),
             rng.normal(0, 1, 5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)),
            (rng.normal(-1.0, 0.5, (3, 2, 2, 4)).astype(np.float32),
             rng.normal(0, 1, 4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32))]
  return images, layers


def test_zeroq_loss_is_its_per_image_mean_and_std_distance(bn_layers):
  """distill_data.py: per image and channel, the spatial mean and sqrt(unbiased var + eps);
  own_loss = ||target - stats||^2 / N, summed over BN layers, plus the input's (0, 1) term."""
  images, layers = bn_layers
  eps = 1e-6

  def own_loss(target_mean, target_std, x):
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    mean, std = flat.mean(1), np.sqrt(flat.var(1, ddof=1) + eps)
    return (((target_mean - mean) ** 2).sum() + ((target_std - std) ** 2).sum()) / x.shape[0]

  expected = sum(own_loss(rm, np.sqrt(rv + eps), x) for x, rm, rv in layers)
  with_input = expected + own_loss(np.zeros(3), np.ones(3), images)
  got = B.zeroq_image_losses(jnp.asarray(images), layers)
  assert got.shape == (3,)
  np.testing.assert_allclose(float(got.mean()), with_input, rtol=1e-5)
  without = B.zeroq_image_losses(jnp.asarray(images), layers, input_statistics=False)
  np.testing.assert_allclose(float(without.mean()), expected, rtol=1e-5)


def test_gdfq_losses_match_numpy(bn_layers):
  _, layers = bn_layers
  bns = np.mean([((x.mean((0, 1, 2)) - rm) ** 2).mean() + ((x.var((0, 1, 2)) - rv) ** 2).mean()
                 for x, rm, rv in layers])  # biased variance, as GDFQ's hook
  np.testing.assert_allclose(float(B.gdfq_bns_loss(layers)), bns, rtol=1e-5)

  rng = np.random.default_rng(1)
  s, t = rng.normal(0, 3, (4, 10)), rng.normal(0, 3, (4, 10))
  labels = np.array([0, 3, 9, 3])
  temperature, alpha = 20.0, 1.0
  log_p_s, log_p_t = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
  pointwise = np.exp(log_p_t) * (log_p_t - log_p_s)  # nn.KLDivLoss(log_p_s, p_t) elementwise
  ce = -np_log_softmax(s)[np.arange(4), labels].mean()
  for reduction, kd in (("elementwise_mean", pointwise.mean()),
                        ("batchmean", pointwise.sum(-1).mean())):
    loss, got_kd, got_ce = B.gdfq_student_loss(jnp.asarray(s), jnp.asarray(t), labels,
                                               temperature, alpha, reduction)
    np.testing.assert_allclose([float(got_kd), float(got_ce)], [kd, ce], rtol=1e-5)
    np.testing.assert_allclose(float(loss), alpha * temperature ** 2 * kd + ce, rtol=1e-5)

  teacher_ce = -np_log_softmax(t)[np.arange(4), labels].mean()
  loss, got_ce, got_bns = B.gdfq_generator_loss(jnp.asarray(t), labels, layers, 0.1)
  np.testing.assert_allclose([float(loss), float(got_ce), float(got_bns)],
                             [teacher_ce + 0.1 * bns, teacher_ce, bns], rtol=1e-5)


def test_every_bn_input_is_found_and_paired_with_its_running_statistics():
  """The captured convolution outputs are the BN inputs that BatchNorm records itself."""
  model = CifarResNet(20)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  leaves, treedef = jax.tree.flatten(variables["batch_stats"])
  leaves = [v + jax.random.uniform(jax.random.key(i), v.shape) for i, v in enumerate(leaves)]
  variables = {"params": variables["params"], "batch_stats": jax.tree.unflatten(treedef, leaves)}
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  _, layers = B.teacher_bn_inputs(model, variables, x)
  _, recorded = model.apply(variables, x, train=False, mutable=[BN_INPUT_STATS])
  recorded = traverse_util.flatten_dict(recorded[BN_INPUT_STATS])
  running = traverse_util.flatten_dict(variables["batch_stats"])
  layer_of = {tuple(np.asarray(v)): path[:-1]  # (the running means are all different)
              for path, v in running.items() if path[-1] == "mean"}
  assert len(layers) == len(layer_of) == 19
  for x_in, running_mean, running_var in layers:
    layer = layer_of[tuple(np.asarray(running_mean))]
    np.testing.assert_array_equal(running_var, running[layer + ("var",)])
    (mean,), (var,) = (jax.tree.leaves(recorded[layer + (k,)]) for k in ("mean", "var"))
    np.testing.assert_allclose(x_in.mean((0, 1, 2)), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_in.var((0, 1, 2), ddof=1), var, rtol=1e-4)


def bn_distance(teacher, teacher_vars, x) -> float:
  """Mean over BN layers and channels of |batch mean - running mean| + |batch std -
  running std|: how far x's BN statistics are from the teacher's."""
  _, layers = B.teacher_bn_inputs(teacher, teacher_vars, x)
  return float(np.mean([np.abs(v.mean((0, 1, 2)) - rm).mean()
                        + np.abs(v.std((0, 1, 2)) - np.sqrt(rv)).mean() for v, rm, rv in layers]))


@pytest.fixture(scope="module")
def teacher(imported_workdir):
  model, variables, _ = classifiers.load_teacher(str(imported_workdir))
  return model, variables


def test_zeroq_distillation_brings_the_bn_statistics_to_the_teachers(teacher):
  model, variables = teacher
  config = zeroq_config.get_config("smoke")
  config.iterations, config.num_batches, config.concurrent_batches = 30, 1, 1
  state = zeroq.initial_state(config, jax.random.key(0))
  noise = state.images[0]
  step = jax.jit(lambda s: zeroq.train_step(s, model, variables))
  losses = []
  for _ in range(config.iterations):
    state, metrics = step(state)
    losses.append(float(metrics["loss_bn"]))
  before, after = bn_distance(model, variables, noise), bn_distance(model, variables,
                                                                   state.images[0])
  print(f"ZeroQ, 8 images, 30 iterations: BN distance noise {before:.4f} -> distilled "
        f"{after:.4f}; ZeroQ loss {losses[0]:.1f} -> {losses[-1]:.1f}")
  assert after < 0.5 * before
  assert losses[-1] < 0.5 * losses[0]


def test_plateau_schedule_lowers_the_rate_after_patience_bad_iterations():
  hp = zeroq.Hyper(500, 1, True, plateau_patience=2, plateau_factor=0.1,
                   plateau_threshold=1e-4, min_learning_rate=1e-3)
  lr, best, bad = jnp.array([0.5]), jnp.array([zeroq.NO_LOSS_YET]), jnp.array([0])
  rates = []
  for loss in (5.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0):
    lr, best, bad = zeroq.plateau_update(jnp.array([loss]), lr, best, bad, hp)
    rates.append(round(float(lr[0]), 6))
  # 3 bad iterations (> patience 2) -> x0.1; again -> floor 1e-3; then no lower
  assert rates == [0.5, 0.5, 0.5, 0.5, 0.05, 0.05, 0.05, 0.05, 0.005, 0.005, 0.005, 0.001]


def test_gdfq_generator_learns_its_labels(teacher):
  """The teacher's cross-entropy of G(z | y) against y falls over a short warm-up."""
  model, variables = teacher
  config = gdfq_config.get_config("smoke")
  generator = gdfq._module(config, 10)
  g_tx, _ = gdfq.generator_optimizer(config)  # the warm-up's: constant lr
  g_vars = gdfq.initial_generator(generator, jax.random.key(0))
  state = gdfq.WarmupState(jnp.zeros((), jnp.int32), g_vars, g_tx.init(g_vars["params"]),
                           dfkd.Models(generator, model, None), g_tx,
                           gdfq.hyper(config, 10, config.batch_size))
  step = jax.jit(lambda s, key: gdfq.warmup_step(s, key, variables))
  ce = []
  for i in range(16):
    state, metrics = step(state, jax.random.key(i))
    ce.append(float(metrics["loss_g_ce"]))
  first, last = np.mean(ce[:4]), np.mean(ce[-4:])
  print(f"GDFQ warm-up, batch 16: teacher CE against the sampled labels {first:.3f} (steps "
        f"1-4) -> {last:.3f} (steps 13-16)")
  assert last < 0.8 * first


@pytest.mark.parametrize("of, drops", [("finetuning", [1300, 1800, 2300]),
                                       ("whole_run", [700, 1400, 2100]),
                                       (None, [700, 1400, 2100])])
def test_gdfq_generator_lr_drops_at_fractions_of_fine_tuning_or_of_the_whole_run(of, drops):
  """GDFQ drops G's lr x0.1 at epochs 100/200/300 of 400, its warm-up 4 epochs: about a quarter
  into fine-tuning either way. The budget's 800 warm-up steps before 2,000 of fine-tuning
  split the two readings; a warm-up checkpoint that recorded none (None) meant the whole
  run."""
  settings = {k: v for k, v in gdfq_config.get_config("budget").items() if k in gdfq.SETTINGS}
  if of is None:
    del settings["lr_milestones_of"]
  else:
    settings["lr_milestones_of"] = of
  assert gdfq.generator_milestones(settings, 800, 2000) == drops
  _, schedule = gdfq.generator_optimizer(settings, drops)
  rates = [float(schedule(step)) for step in (800, drops[0], drops[1], drops[2])]
  assert rates == pytest.approx([1e-3 if of == "finetuning" else 1e-4, 1e-4, 1e-5, 1e-6])
