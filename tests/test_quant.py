"""Fake quantization against NumPy, STE and clip gradients (the clip rules: test_calibration.py)."""
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
