"""The reference code's clip rules (METHOD.md, "Calibration rules, exactly"), in NumPy.

Each rule maps one tensor to a clip value alpha > 0: a weight (`signed`: symmetric grid,
scale (2^(b-1) - 1) / alpha, integers [-2^(b-1), 2^(b-1) - 1]) or one calibration batch of
the *input* of a ReLU whose output is quantized (`signed=False`: scale (2^b - 1) / alpha,
integers [0, 2^b - 1]). For unsigned tensors every rule first sets the negative values to 0
(the ReLU's output), except aciq's spread estimates, which use the ReLU's input as it is.

A tensor is read once: `summarize` keeps what the requested rules need of it (its largest
magnitude, its histograms, aciq's spread estimates), independent of the bit width, so a PTQ
table calibrates every bit width and method from one pass over each tensor; `clip` then
scores all candidate clips of a rule at once (a candidates x bins array). Histograms bin the
tensor in its own dtype, as the reference does; the scoring is float64.

A tensor whose largest magnitude (after the zeroing) is 0 has nothing to quantize: every rule
returns TINY_CLIP (the reference divides by zero there).
"""
import dataclasses
import math

import numpy as np

TINY_CLIP = 1e-8
MSE_BINS = 201
MSE_FRACTIONS = np.arange(1, 100) / 100.0  # candidates: 0.01, ..., 0.99 of max|v|
FT_FLOOR = 0.5  # ft: alpha = max(FT_FLOOR * max|v|, mse clip)
ACIQ_BINS = 101
ACIQ_GAUSS_CONST = 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4)))
# Optimal clip / spread at b bits (Banner et al.), as tabulated in the reference code.
ACIQ_GAUSS = {
    True: {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92},
    False: {1: 1.71, 2: 2.15, 3: 2.55, 4: 2.93, 5: 3.28, 6: 3.61, 7: 3.92, 8: 4.2},
}
ACIQ_LAPLACE = {
    True: {1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89},
    False: {1: 2.83, 2: 3.89, 3: 5.02, 4: 6.2, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16},
}
KL_BINS = 1001
KL_SMOOTHING = 1e-4
# What each rule reads of a tensor (see Summary).
NEEDS = {"max": (), "mse": ("mse",), "ft": ("mse",), "aciq": ("aciq",), "kl": ("kl",)}


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
  """[-2^(b-1), 2^(b-1) - 1] (signed) or [0, 2^b - 1] (unsigned)."""
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2**bits - 1


def quantize(x, alpha, bits: int, signed: bool):
  """Q(x; alpha): quantize-dequantize with round-half-to-even, as the reference writes it
  (round(x * scale) / scale with scale = q_max / alpha). Broadcasts x against alpha."""
  q_min, q_max = integer_range(bits, signed)
  scale = q_max / alpha
  return np.clip(np.round(x * scale), q_min, q_max) / scale


def histogram_error(centres, weights, alphas, bits: int, signed: bool) -> np.ndarray:
  """E(alpha) for each alpha: clipping error (|x_i| - alpha)^2 on bins beyond alpha (charged
  on both sides, as if the grid were [-alpha, alpha]) plus rounding error inside."""
  alphas = np.asarray(alphas, np.float64)[:, None]
  beyond = np.abs(centres) > alphas
  rounding = (centres - quantize(centres, alphas, bits, signed)) ** 2
  per_bin = np.where(beyond, (np.abs(centres) - alphas) ** 2, rounding)
  return (weights * per_bin).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class Summary:
  """What the rules read of one tensor, for any bit width.

  top: max|v| after the zeroing. mse: (centres, weights) of 201 bins over [min, max],
  weights summing to 1. aciq: (alpha_G / A_G, alpha_L / A_L) = (sigma, beta) of the tensor
  as given, and (centres, density) of 101 bins over [-top, top]. kl: (counts, edges) of 1001
  bins over [-top, top]. Parts a rule does not need are None.
  """

  signed: bool
  top: float
  mse: tuple | None = None
  aciq: tuple | None = None
  kl: tuple | None = None


def _bins(x, bins: int, lo, hi):
  """(counts, edges, centres) of `bins` equal bins over [lo, hi] (numpy's binning)."""
  counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
  edges = edges.astype(np.float64)
  return counts, edges, (edges[:-1] + edges[1:]) / 2


def summarize(values, signed: bool, methods=tuple(NEEDS)) -> Summary:
  """Reads `values` once for the rules in `methods`."""
  v = np.asarray(values)
  v = (v if v.dtype in (np.float32, np.float64) else v.astype(np.float64)).ravel()
  x = v if signed else np.maximum(v, 0)
  lo, hi = x.min(), x.max()
  top = float(max(-lo, hi))
  needs = {part for method in methods for part in NEEDS[method]}
  if top == 0 or not needs:
    return Summary(signed, top)
  parts = {}
  if "mse" in needs:
    counts, _, centres = _bins(x, MSE_BINS, lo, hi)
    parts["mse"] = (centres, counts / counts.sum())
  if "aciq" in needs:
    mean = v.mean(dtype=np.float64)
    beta = float(np.abs(v - v.dtype.type(mean)).mean(dtype=np.float64))
    sigma = (float(v.max()) - float(v.min())) * ACIQ_GAUSS_CONST / math.sqrt(
        2 * math.log(v.size)) if v.size > 1 else 0.0
    counts, edges, centres = _bins(x, ACIQ_BINS, -top, top)
    parts["aciq"] = ((sigma, beta), (centres, counts / (counts.sum() * np.diff(edges))))
  if "kl" in needs:
    counts, edges, _ = _bins(x, KL_BINS, -top, top)
    parts["kl"] = (counts, edges)
  return Summary(signed, top, **parts)


def clip_max(s: Summary, bits: int) -> float:
  """alpha = max|v| (after the zeroing)."""
  return s.top


def clip_mse(s: Summary, bits: int) -> float:
  """The first of {0.01, ..., 0.99} x max|v| with the least histogram error E, on 201 bins
  over the data's own range [min v, max v], counts normalized to sum 1."""
  centres, weights = s.mse
  alphas = MSE_FRACTIONS * s.top
  return float(alphas[int(np.argmin(histogram_error(centres, weights, alphas, bits, s.signed)))])


def clip_ft(s: Summary, bits: int) -> float:
  """The fine-tuning start: max(0.5 * max|v|, mse clip)."""
  return max(FT_FLOOR * s.top, clip_mse(s, bits))


def clip_aciq(s: Summary, bits: int) -> float:
  """Of alpha_G = A_G[b] sigma (sigma = (max - min) g / sqrt(2 ln N)) and alpha_L = A_L[b] beta
  (beta = E|v - E v|): alpha_G if its histogram error (101 bins over [-m, m], density weights)
  is strictly smaller than alpha_L's, else alpha_L.

  A tensor without spread (constant, or one element) has no usable candidate (both are 0);
  alpha = max|v| represents it exactly and is returned instead.
  """
  (sigma, beta), (centres, density) = s.aciq
  gauss, laplace = ACIQ_GAUSS[s.signed][bits] * sigma, ACIQ_LAPLACE[s.signed][bits] * beta
  if not (gauss > 0 and laplace > 0):
    return s.top
  e_gauss, e_laplace = histogram_error(centres, density, [gauss, laplace], bits, s.signed)
  return float(gauss if e_gauss < e_laplace else laplace)


def _smooth(counts, valid):
  """Every zero bin (of the valid ones) gets 1e-4, every non-zero bin loses
  1e-4 * #zeros / #non-zeros; one candidate per row. Also says which rows have mass."""
  zeros = valid & (counts == 0)
  nonzeros = valid & (counts != 0)
  num_nonzero = nonzeros.sum(axis=1, keepdims=True)
  eps1 = KL_SMOOTHING * zeros.sum(axis=1, keepdims=True) / np.maximum(num_nonzero, 1)
  return counts + KL_SMOOTHING * zeros - eps1 * nonzeros, num_nonzero[:, 0] > 0


def kl_divergences(s: Summary, bits: int):
  """(thresholds, divergences) of the entropy calibration, one per candidate slice.

  Qb = 2^b - 1. Candidate i = Qb//2 .. 500 takes the 2i+1 bins of the 1001-bin histogram
  centred on the middle one; its threshold is the slice's upper edge. p = the slice plus the
  outliers left / right of it in its first / last bin. q: the slice cut into Qb groups of
  n = (2i+1)//Qb bins (the last takes the rest), each group's count spread evenly over its
  bins that are non-empty in the slice (for the last group the range stops one bin short of
  the slice's end: the reference's quirk). Both smoothed, normalized, compared by KL(p || q);
  a q with no mass diverges.
  """
  counts, edges = s.kl
  middle, levels = KL_BINS // 2, 2**bits - 1
  half = np.arange(levels // 2, middle + 1)[:, None]  # i, one row per candidate
  length = 2 * half + 1
  position = np.arange(KL_BINS)[None, :]  # j, the bin's index inside the slice
  valid = position < length
  start = middle - half
  sliced = np.where(valid, counts[np.minimum(start + position, KL_BINS - 1)], 0).astype(float)
  cumulative = np.concatenate([[0], np.cumsum(counts)])
  rows = np.arange(len(half))
  p = sliced.copy()
  p[:, 0] += cumulative[start[:, 0]]
  p[rows, length[:, 0] - 1] += cumulative[-1] - cumulative[(start + length)[:, 0]]

  group = np.minimum(position // (length // levels), levels - 1)
  spread = valid & ((group < levels - 1) | (position < length - 1)) & (sliced > 0)
  key = rows[:, None] * levels + group
  group_count = np.bincount(key[valid], sliced[valid], minlength=len(rows) * levels)
  group_nonempty = np.bincount(key[spread], minlength=len(rows) * levels)
  q = np.where(spread, (group_count / np.maximum(group_nonempty, 1))[key], 0.0)

  p, _ = _smooth(p, valid)
  q, q_has_mass = _smooth(q, valid)
  p /= p.sum(axis=1, keepdims=True)
  q /= np.where(q_has_mass, q.sum(axis=1), 1.0)[:, None]
  with np.errstate(divide="ignore", invalid="ignore"):
    divergences = np.where(valid, p * np.log(p / q), 0.0).sum(axis=1)
  divergences[~q_has_mass | np.isnan(divergences)] = np.inf
  return edges[middle + half[:, 0] + 1], divergences


def clip_kl(s: Summary, bits: int) -> float:
  """The threshold of the slice with the least KL(p || q) (the first on ties)."""
  thresholds, divergences = kl_divergences(s, bits)
  return float(thresholds[int(np.argmin(divergences))])


CLIP_RULES = {"max": clip_max, "mse": clip_mse, "aciq": clip_aciq, "kl": clip_kl, "ft": clip_ft}


def clip(method: str, s: Summary, bits: int) -> float:
  """The clip of the summarized tensor by rule `method` at `bits`."""
  return CLIP_RULES[method](s, bits) if s.top > 0 else TINY_CLIP
