"""Fake quantization with the straight-through estimator (STE) and learned clip values.

Forward values are exactly those of integer quantization followed by dequantization.
Gradients:
  * w.r.t. the input: identity inside the clip range, zero outside (STE for round,
    derivative of the clamp);
  * w.r.t. the clip value c: the true derivative of the fake-quant function wherever the
    rounded integer is locally constant, i.e. round(x / step) / q_max inside the range and
    q_min / q_max or 1 where the input is clamped. It matches a finite difference of the
    forward function away from rounding boundaries.
"""
import dataclasses


import jax
import jax.numpy as jnp
import numpy as np

FULL_PRECISION_BITS = 32
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION_BITS)
PROTOCOLS = ("dfqf", "standard")


def signed_range(bits: int) -> tuple[int, int]:
  """Integer grid of a signed symmetric quantizer: [-2^(b-1), 2^(b-1) - 1]."""
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
  """Integer grid of an unsigned quantizer: [0, 2^b - 1]."""
  return 0, 2**bits - 1


def _fake_quant(x, clip, q_min: int, q_max: int):
  step = clip / q_max
  integers = jax.lax.stop_gradient(jnp.clip(jnp.round(x / step), q_min, q_max))
  lower = jax.lax.stop_gradient(q_min * step)
  upper = jax.lax.stop_gradient(q_max * step)
  clamped = jnp.clip(x, lower, upper)
  # Value: integers * step. Gradient to x: through `clamped` (STE); to clip: through step.
  return integers * step + (clamped - jax.lax.stop_gradient(clamped))


def fake_quant_signed(x, clip, bits: int):
  """Symmetric signed fake quantization, step = clip / (2^(b-1) - 1)."""
  if bits == FULL_PRECISION_BITS:
    return x
  return _fake_quant(x, clip, *signed_range(bits))


def fake_quant_unsigned(x, clip, bits: int):
  """Unsigned fake quantization (post-ReLU activations), step = clip / (2^b - 1)."""
  if bits == FULL_PRECISION_BITS:
    return x
  return _fake_quant(x, clip, *unsigned_range(bits))


def fake_quant_minmax_per_channel(w, bits: int):
  """Asymmetric per-output-channel min/max fake quantization (GDFQ-style protocol).

  The last axis is the output channel. scale = (max - min) / (2^b - 1),
  zero point = round(-min / scale); the STE passes the gradient to w unchanged.
  """
  if bits == FULL_PRECISION_BITS:
    return w
  reduce_axes = tuple(range(w.ndim - 1))
  w_min = jax.lax.stop_gradient(jnp.minimum(w.min(reduce_axes), 0.0))
  w_max = jax.lax.stop_gradient(jnp.maximum(w.max(reduce_axes), 0.0))
  q_max = 2**bits - 1
  scale = jnp.maximum(w_max - w_min, 1e-8) / q_max
  zero_point = jnp.round(-w_min / scale)
  integers = jnp.clip(jnp.round(w / scale) + zero_point, 0, q_max)
  dequantized = (integers - zero_point) * scale
  return w + jax.lax.stop_gradient(dequantized - w)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which tensors of a ResNet are fake-quantized, and at which widths.

  protocol 'dfqf' (the reference code): per-tensor symmetric weight clips, first conv and
  last dense at `first_last_weight_bits`, activations after both ReLUs of every residual
  block. protocol 'standard' (GDFQ/Qimera/IntraQ/HAST/SynQ tables): every conv and the
  dense layer at `weight_bits` with per-output-channel min/max, activations after every ReLU.
  """

  weight_bits: int = 4
  act_bits: int = 4
  protocol: str = "dfqf"
  first_last_weight_bits: int = 8

  @property
  def edge_weight_bits(self) -> int:
    if self.protocol == "standard" or self.weight_bits == FULL_PRECISION_BITS:
      return self.weight_bits
    return self.first_last_weight_bits

  @property
  def quantize_stem_activation(self) -> bool:
    return self.protocol == "standard"


# --------------------------------------------------------------------------------------
# Clip calibration. Each rule maps a tensor (a weight, or one batch of an activation) to a
# clip value c > 0 for a signed (weights) or unsigned (post-ReLU activations) grid.
# --------------------------------------------------------------------------------------
CALIBRATIONS = ("max", "mse", "aciq", "kl", "ft")
MSE_BINS = 201
MSE_CANDIDATES = np.arange(1, 100) / 100.0  # 0.01, ..., 0.99 of max|v|
# ACIQ (Banner et al. 2019): optimal clip / b for a Laplace(b) distribution at 2..8 bits.
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89, 9: 11.16}
KL_BINS = 2048


def _quantize_np(x, clip, bits: int, signed: bool):
  q_min, q_max = signed_range(bits) if signed else unsigned_range(bits)
  step = clip / q_max
  return np.clip(np.round(x / step), q_min, q_max) * step


def clip_max(v, bits: int, signed: bool) -> float:
  return float(np.abs(v).max())


def clip_mse(v, bits: int, signed: bool, bins: int = MSE_BINS) -> float:
  """The clip among {0.01, ..., 0.99} x max|v| with the least histogram-estimated error.

  The error of a candidate is sum_i n_i (x_i - Q(x_i))^2 over the `bins` histogram bins
  (counts n_i, centres x_i) of v on [-max|v|, max|v|] (signed) or [0, max] (unsigned),
  where Q clips and rounds at `bits`: clipping and rounding error together.
  """
  v = np.asarray(v, np.float64).ravel()
  top = float(np.abs(v).max())
  if top == 0:
    return 1e-8
  counts, edges = np.histogram(v, bins=bins, range=(-top if signed else 0.0, top))
  centres = (edges[:-1] + edges[1:]) / 2
  clips = MSE_CANDIDATES * top
  errors = [np.sum(counts * (centres - _quantize_np(centres, c, bits, signed)) ** 2)
            for c in clips]
  return float(clips[int(np.argmin(errors))])


def clip_aciq(v, bits: int, signed: bool) -> float:
  """ACIQ with a Laplace prior: c = alpha(bits) * E|v - E v|, at most max|v|.

  A one-sided (post-ReLU) tensor spends all 2^b levels on half the range, as a signed grid
  with one more bit would, so unsigned tensors use alpha(bits + 1).
  """
  v = np.asarray(v, np.float64).ravel()
  b = float(np.mean(np.abs(v - v.mean())))
  alpha = ACIQ_LAPLACE[bits if signed else bits + 1]
  return float(min(alpha * b, np.abs(v).max())) or 1e-8


def clip_kl(v, bits: int, signed: bool, bins: int = KL_BINS) -> float:
  """TensorRT-style entropy calibration on the histogram of |v|.

  For each candidate threshold (a bin edge), P = the histogram up to it with the outliers
  added to the last bin, Q = the histogram up to it *without* the outliers, merged into the
  available quantization levels and spread back over its non-empty bins; the threshold
  minimizing KL(P || Q) is chosen.
  """
  magnitudes = np.abs(np.asarray(v, np.float64).ravel())
  if not signed:
    # Exact zeros (half of a post-ReLU tensor) are exact on any unsigned grid; left in, the
    # spike in bin 0 dominates the divergence and drives the threshold far too low.
    magnitudes = magnitudes[magnitudes > 0]
    if magnitudes.size == 0:
      return 1e-8
  top = float(magnitudes.max())
  if top == 0:
    return 1e-8
  hist, edges = np.histogram(magnitudes, bins=bins, range=(0.0, top))
  levels = 2 ** (bits - 1) if signed else 2**bits
  best, best_kl = bins, np.inf
  for stop in range(levels, bins + 1, 8):
    clipped = hist[:stop].astype(np.float64)
    p = clipped.copy()
    p[-1] += hist[stop:].sum()  # the outliers, clipped into the last bin
    nonzero = p > 0
    # Q quantizes the histogram *without* the outliers, so clipping mass away shows up as
    # a divergence (as in TensorRT / MXNet).
    sizes = np.full(levels, stop // levels) + (np.arange(levels) < stop % levels)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    mass = np.add.reduceat(clipped, starts)
    filled = np.add.reduceat((clipped > 0).astype(np.float64), starts)
    q = np.repeat(mass / np.maximum(filled, 1), sizes) * (clipped > 0)
    p_n, q_n = p / p.sum(), q / max(q.sum(), 1e-12)
    kl = np.sum(p_n[nonzero] * np.log(p_n[nonzero] / np.maximum(q_n[nonzero], 1e-12)))
    if kl < best_kl:
      best, best_kl = stop, kl
  return float(edges[best])


def clip_ft(v, bits: int, signed: bool) -> float:
  """The reference code's rule: max(0.5 * max|v|, c_mse)."""
  return max(0.5 * clip_max(v, bits, signed), clip_mse(v, bits, signed))


CLIP_RULES = {"max": clip_max, "mse": clip_mse, "aciq": clip_aciq, "kl": clip_kl, "ft": clip_ft}


def calibrate_clip(method: str, v, bits: int, signed: bool) -> float:
  """Clip of `v` by `method`. Weights (signed) under `kl` use max|w|, as TensorRT does:
  a weight tensor is fully known, and a 2048-bin histogram of a small kernel is too sparse
  for a meaningful divergence."""
  if method not in CLIP_RULES:
    raise ValueError(f"calibration={method!r} is unknown; use one of {list(CLIP_RULES)}.")
  if method == "kl" and signed:
    method = "max"
  return CLIP_RULES[method](v, bits, signed)
