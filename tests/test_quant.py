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


def _weight_bits_in_model(spec: q.QuantSpec, depth: int = 20) -> set:
  """The module paths whose kernels the built model quantizes with a learned clip, read off
  its parameters: a `weight_clip` says a dfqf-protocol quantized kernel."""
  from flax import traverse_util

  from dfqf_jax.models.resnet import CifarResNet
  shapes = jax.eval_shape(lambda: CifarResNet(depth, quant=spec).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  return {"/".join(path[:-1]) for path in traverse_util.flatten_dict(shapes["params"])
          if path[-1] == q.WEIGHT_CLIP}


@pytest.mark.parametrize("depth", [20, 56])
def test_quantization_rules_dfqf_keeps_the_stem_and_head_at_8_bits(depth):
  spec = q.QuantSpec(4, 4, "dfqf")
  assert spec.weight_bits_of("conv1") == spec.weight_bits_of(("linear",)) == 8
  assert spec.weight_bits_of("layer1_0/conv1") == spec.weight_bits_of("layer3_2/conv2") == 4
  # The model quantizes every conv and the dense layer (one clip each): depth - 1 convs + 1
  # dense, and only the stem and the head at 8 bits.
  paths = _weight_bits_in_model(spec, depth)
  assert len(paths) == depth
  assert {p for p in paths if spec.weight_bits_of(p) == 8} == {"conv1", "linear"}


def test_quantization_rules_standard_and_full_precision_use_one_width_everywhere():
  standard = q.QuantSpec(3, 3, "standard")
  assert {standard.weight_bits_of(p) for p in ("conv1", "layer2_1/conv1", "linear")} == {3}
  assert standard.first_last_weight_bits == 3  # the metadata says so too
  assert not _weight_bits_in_model(standard)  # per-channel min/max: no learned weight clips
  fp = q.QuantSpec(q.FULL_PRECISION_BITS, 4, "dfqf")
  assert fp.weight_bits_of("conv1") == fp.weight_bits_of("layer1_0/conv1") == 32
  assert not _weight_bits_in_model(fp)


def test_bit_widths_parse_or_say_the_form():
  assert q.parse_bits("w8a8, W4A4") == [(8, 8), (4, 4)]
  with pytest.raises(ValueError, match="w<bits>a<bits>"):
    q.parse_bits("4bit")
