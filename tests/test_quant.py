"""Fake quantization against NumPy, STE and clip gradients, calibration rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfqf_jax import quant as q

BITS = (2, 3, 4, 5, 6, 7, 8)


def np_fake_quant(x, clip, bits, signed):
  if signed:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  else:
    lo, hi = 0, 2**bits - 1
  step = clip / hi
  return np.clip(np.round(x / step), lo, hi) * step


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_values_match_numpy_integer_grid(bits, signed):
  rng = np.random.default_rng(bits)
  x = rng.normal(0, 1.5, 1000).astype(np.float32)
  clip = np.float32(1.3)
  fq = q.fake_quant_signed if signed else q.fake_quant_unsigned
  got = np.asarray(fq(jnp.asarray(x), clip, bits))
  np.testing.assert_allclose(got, np_fake_quant(x, clip, bits, signed), rtol=1e-6, atol=1e-7)
  step = clip / (2 ** (bits - 1) - 1 if signed else 2**bits - 1)
  levels = np.unique(np.round(got / step))
  assert len(levels) <= 2**bits
  assert levels.min() >= (-(2 ** (bits - 1)) if signed else 0)


def test_full_precision_is_identity():
  x = jnp.linspace(-3, 3, 11)
  assert (q.fake_quant_signed(x, 1.0, 32) == x).all()
  assert (q.fake_quant_unsigned(x, 1.0, 32) == x).all()


@pytest.mark.parametrize("signed", [True, False])
def test_ste_gradient_is_identity_inside_and_zero_outside(signed):
  clip, bits = 1.0, 4
  x = jnp.array([-2.0, -0.51, -0.2, 0.05, 0.33, 0.7, 0.99, 1.5, 3.0])  # no exact boundary
  fq = q.fake_quant_signed if signed else q.fake_quant_unsigned
  grad = jax.grad(lambda v: fq(v, clip, bits).sum())(x)
  low = -(2 ** (bits - 1)) * clip / (2 ** (bits - 1) - 1) if signed else 0.0
  inside = (x > low) & (x < clip)
  np.testing.assert_array_equal(grad, inside.astype(np.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_clip_gradient_matches_finite_differences(bits, signed):
  rng = np.random.default_rng(0)
  x = rng.normal(0, 1, 400)
  clip = 1.1
  hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
  # keep points whose rounding stays put under a +-h change of the clip
  v = x / (clip / hi)
  x = x[np.abs(v - np.round(v) - 0.5 * np.sign(v - np.round(v))) > 0.05]
  fq = q.fake_quant_signed if signed else q.fake_quant_unsigned
  weights = rng.normal(size=x.shape)
  f = lambda c: float(np.sum(weights * np_fake_quant(x, c, bits, signed)))
  h = 1e-5
  numeric = (f(clip + h) - f(clip - h)) / (2 * h)
  x32 = jnp.asarray(x, jnp.float32)
  analytic = jax.grad(lambda c: jnp.sum(jnp.asarray(weights, jnp.float32) * fq(x32, c, bits)))(
      jnp.float32(clip))
  np.testing.assert_allclose(analytic, numeric, rtol=1e-3)


def test_per_channel_minmax_keeps_each_channels_range():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(3, 3, 8, 4)) * np.array([0.1, 1.0, 5.0, 0.01])
  out = np.asarray(q.fake_quant_minmax_per_channel(jnp.asarray(w, jnp.float32), 4))
  for c in range(4):
    scale = (max(w[..., c].max(), 0) - min(w[..., c].min(), 0)) / 15
    assert np.abs(out[..., c] - w[..., c]).max() <= scale / 2 + 1e-6
  grad = jax.grad(lambda v: q.fake_quant_minmax_per_channel(v, 4).sum())(jnp.asarray(w))
  np.testing.assert_array_equal(grad, np.ones_like(w))


def test_mse_clip_search_finds_the_known_optimum():
  """Uniform data on [-1, 1] plus a single outlier at 10: the best clip sits near 1
  (cutting the outlier costs far less than coarse steps for everything else); it must agree
  with a brute-force search on the exact data to one candidate step."""
  rng = np.random.default_rng(2)
  v = np.concatenate([rng.uniform(-1, 1, 100_000), [10.0]])
  clip = q.clip_mse(v, 4, signed=True)
  # brute force over the same candidates on the exact data
  candidates = np.arange(1, 100) / 100 * 10.0
  errors = [np.mean((v - np_fake_quant(v, c, 4, True)) ** 2) for c in candidates]
  best = candidates[int(np.argmin(errors))]
  assert abs(clip - best) <= 0.1 + 1e-9
  assert 0.8 <= clip <= 1.3


def test_ft_rule_is_max_of_half_max_and_mse():
  rng = np.random.default_rng(3)
  v = np.abs(rng.standard_cauchy(10_000))
  assert q.clip_ft(v, 4, False) == max(0.5 * v.max(), q.clip_mse(v, 4, False))


def test_aciq_and_kl_clip_below_the_max_for_heavy_tails():
  rng = np.random.default_rng(4)
  v = np.maximum(rng.laplace(size=100_000), 0)
  for rule in (q.clip_aciq, q.clip_kl):
    clip = rule(v, 4, False)
    assert 0 < clip < v.max()


def test_unknown_calibration_is_rejected():
  with pytest.raises(ValueError, match="unknown"):
    q.calibrate_clip("percentile", np.ones(3), 4, True)
