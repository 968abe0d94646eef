"""The clip rules of METHOD.md ("Calibration rules, exactly"), each against an independent
derivation: scalar Python loops written from the spec's text, or a tensor whose answer is
known in closed form; every bit width 2..8; signed tensors with an asymmetric range, ReLU
inputs with many exact zeros, constant tensors. Then the calibration of a whole student."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune
from dfqf_jax import calibration, clip_rules
from dfqf_jax import quant as q
from dfqf_jax.models.resnet import CifarResNet

BITS = (2, 3, 4, 5, 6, 7, 8)
RNG = np.random.default_rng(0)
TENSORS = {  # name -> (values, signed)
    # a weight-like tensor whose range is far from symmetric: [-0.7, 2.0]
    "signed_asymmetric": (np.concatenate([RNG.normal(0, 0.2, 4000), RNG.uniform(0.5, 2.0, 40),
                                          [-0.7]]).astype(np.float32), True),
    "signed_laplace": (RNG.laplace(0, 0.05, 3000).astype(np.float32), True),
    # a ReLU input: 58% negative (zeros after the ReLU) plus exact zeros
    "relu_input": (np.concatenate([RNG.normal(-0.2, 1.0, 6000), np.zeros(500)]
                                  ).astype(np.float32), False),
    "relu_input_heavy_tail": (RNG.standard_t(2, 6000).astype(np.float32), False),
}


# ---- independent derivations, one scalar at a time ---------------------------------------
def quantize_scalar(x: float, alpha: float, bits: int, signed: bool) -> float:
  q_min, q_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
  scale = q_max / alpha
  return min(max(round(x * scale), q_min), q_max) / scale  # round(): half to even


def error_scalar_loop(centres, weights, alpha, bits, signed) -> float:
  total = 0.0
  for x, w in zip(centres.tolist(), weights.tolist()):
    if abs(x) > alpha:
      total += w * (abs(x) - alpha) ** 2
    else:
      total += w * (x - quantize_scalar(x, alpha, bits, signed)) ** 2
  return total


def relu_if_unsigned(v, signed):
  return v if signed else np.where(v < 0, np.float32(0), v)


def bin_centres(edges):
  edges = edges.astype(np.float64)
  return (edges[:-1] + edges[1:]) / 2


def mse_errors(v, bits, signed):
  """(candidates, E of each): 201 bins over [min, max], normalized counts, k/100 * m."""
  x = relu_if_unsigned(v, signed)
  counts, edges = np.histogram(x, bins=201, range=(x.min(), x.max()))
  m = float(np.abs(x).max())
  alphas = [k / 100 * m for k in range(1, 100)]
  return alphas, [error_scalar_loop(bin_centres(edges), counts / counts.sum(), a, bits, signed)
                  for a in alphas]


def assert_first_minimum(chosen, alphas, errors):
  """`chosen` is the first candidate with the least error (float ties: equal errors)."""
  best = errors.index(min(errors))
  chosen_index = int(np.argmin(np.abs(np.asarray(alphas) - chosen)))
  assert chosen == pytest.approx(alphas[chosen_index], rel=1e-12)
  assert errors[chosen_index] <= min(errors) * (1 + 1e-9)
  assert chosen_index <= best or errors[best] == pytest.approx(errors[chosen_index], rel=1e-9)


def aciq_derivation(v, bits, signed):
  """(alpha_G, alpha_L, E_G, E_L) from the spec's formulas, written out again."""
  raw = v.astype(np.float64)
  g = 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4)))
  sigma = (raw.max() - raw.min()) * g / math.sqrt(2 * math.log(raw.size))
  beta = np.mean(np.abs(raw - raw.mean()))
  a_g = ({1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92} if signed else
         {1: 1.71, 2: 2.15, 3: 2.55, 4: 2.93, 5: 3.28, 6: 3.61, 7: 3.92, 8: 4.2})[bits]
  a_l = ({1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89} if signed else
         {1: 2.83, 2: 3.89, 3: 5.02, 4: 6.2, 5: 7.41, 6: 8.64, 7: 9.89, 8: 11.16})[bits]
  x = relu_if_unsigned(v, signed)
  m = float(np.abs(x).max())
  density, edges = np.histogram(x, bins=101, range=(-m, m), density=True)
  e_g = error_scalar_loop(bin_centres(edges), density, a_g * sigma, bits, signed)
  e_l = error_scalar_loop(bin_centres(edges), density, a_l * beta, bits, signed)
  return a_g * sigma, a_l * beta, e_g, e_l


def smooth_loop(dist):
  zeros = sum(1 for d in dist if d == 0)
  nonzeros = len(dist) - zeros
  if nonzeros == 0:
    return None
  eps1 = 1e-4 * zeros / nonzeros
  return [1e-4 if d == 0 else d - eps1 for d in dist]


def kl_derivation(v, bits, signed):
  """(thresholds, divergences), one slice at a time, as METHOD.md words it."""
  x = relu_if_unsigned(v, signed)
  m = float(np.abs(x).max())
  hist, edges = np.histogram(x, bins=1001, range=(-m, m))
  hist = hist.tolist()
  levels = 2**bits - 1
  thresholds, divergences = [], []
  for i in range(levels // 2, 501):
    first, last = 500 - i, 500 + i  # the slice: bins first..last
    sliced = hist[first:last + 1]
    p = list(sliced)
    p[0] += sum(hist[:first])
    p[-1] += sum(hist[last + 1:])
    n = len(sliced) // levels
    q = [0.0] * len(sliced)
    for group in range(levels):
      begin = group * n
      end = begin + n if group < levels - 1 else len(sliced)  # the last takes the rest
      total = sum(sliced[begin:end])
      spread_end = end if group < levels - 1 else len(sliced) - 1  # the quirk
      nonempty = [j for j in range(begin, spread_end) if sliced[j] != 0]
      for j in nonempty:
        q[j] = total / len(nonempty)
    p, q = smooth_loop(p), smooth_loop(q)
    thresholds.append(float(edges[last + 1]))
    if q is None:
      divergences.append(math.inf)
      continue
    sp, sq = sum(p), sum(q)
    divergences.append(sum(a / sp * math.log((a / sp) / (b / sq)) for a, b in zip(p, q)))
  return thresholds, divergences


# ---- each rule against its derivation ----------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", sorted(TENSORS))
def test_mse_is_the_first_candidate_with_the_least_histogram_error(name, bits):
  v, signed = TENSORS[name]
  alphas, errors = mse_errors(v, bits, signed)
  assert_first_minimum(q.calibrate_clip("mse", v, bits, signed), alphas, errors)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", sorted(TENSORS))
def test_ft_is_the_larger_of_half_the_max_and_the_mse_clip(name, bits):
  v, signed = TENSORS[name]
  top = float(np.abs(relu_if_unsigned(v, signed)).max())
  assert q.calibrate_clip("ft", v, bits, signed) == max(
      0.5 * top, q.calibrate_clip("mse", v, bits, signed))


def test_ft_takes_half_the_max_when_the_mse_clip_is_smaller():
  v = np.concatenate([np.random.default_rng(3).uniform(-1, 1, 10_000), [10.0]])
  assert q.calibrate_clip("mse", v, 4, True) < 5.0
  assert q.calibrate_clip("ft", v, 4, True) == 5.0


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_max_is_the_largest_magnitude_after_the_relu(name):
  v, signed = TENSORS[name]
  expected = float(np.abs(v).max()) if signed else float(v.max())
  assert q.calibrate_clip("max", v, 4, signed) == expected


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", sorted(TENSORS))
def test_aciq_picks_the_candidate_with_the_smaller_histogram_error(name, bits):
  v, signed = TENSORS[name]
  gauss, laplace, e_gauss, e_laplace = aciq_derivation(v, bits, signed)
  expected = gauss if e_gauss < e_laplace else laplace
  assert q.calibrate_clip("aciq", v, bits, signed) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("signed", [True, False])
def test_aciq_chooses_gaussian_for_gaussian_samples_and_laplace_for_laplace_samples(signed):
  """The spread estimates recover the true scale (sigma = 2, b = 2), and the histogram error
  prefers the candidate of the distribution the samples were drawn from."""
  rng = np.random.default_rng(5)
  gaussian, laplacian = rng.normal(0, 2.0, 200_000), rng.laplace(0, 2.0, 200_000)
  for samples, chosen in ((gaussian, 0), (laplacian, 1)):
    s = clip_rules.summarize(samples, signed, ["aciq"])
    sigma, beta = s.aciq[0]
    candidates = (clip_rules.ACIQ_GAUSS[signed][4] * sigma,
                  clip_rules.ACIQ_LAPLACE[signed][4] * beta)
    assert q.calibrate_clip("aciq", samples, 4, signed) == candidates[chosen]
  assert clip_rules.summarize(gaussian, True, ["aciq"]).aciq[0][0] == pytest.approx(2.0, rel=0.1)
  assert clip_rules.summarize(laplacian, True, ["aciq"]).aciq[0][1] == pytest.approx(2.0, rel=0.02)


def test_aciq_spread_of_activations_comes_from_the_relu_input():
  v, _ = TENSORS["relu_input"]
  sigma, beta = clip_rules.summarize(v, False, ["aciq"]).aciq[0]
  g = 0.5 * 0.35 * (1 + math.sqrt(math.pi * math.log(4)))
  assert sigma == pytest.approx((v.max() - v.min()) * g / math.sqrt(2 * math.log(v.size)))
  assert v.min() < -1  # the input's negative part counts
  assert beta == pytest.approx(np.mean(np.abs(v - v.mean(dtype=np.float64))), rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", sorted(TENSORS))
def test_kl_is_the_threshold_of_least_divergence_slice_by_slice(name, bits):
  v, signed = TENSORS[name]
  thresholds, divergences = kl_derivation(v, bits, signed)
  got_thresholds, got_divergences = clip_rules.kl_divergences(
      clip_rules.summarize(v, signed, ["kl"]), bits)
  np.testing.assert_allclose(got_thresholds, thresholds, rtol=1e-12)
  finite = np.isfinite(divergences)
  np.testing.assert_array_equal(np.isfinite(got_divergences), finite)
  np.testing.assert_allclose(got_divergences[finite], np.asarray(divergences)[finite],
                             rtol=1e-7, atol=1e-12)
  assert_first_minimum(q.calibrate_clip("kl", v, bits, signed), thresholds, divergences)


def test_kl_keeps_the_whole_range_of_a_uniform_tensor():
  """Uniform data: every clipped slice piles its outliers into an edge bin that q cannot
  follow, so the full range (the last candidate, threshold = max|v|) diverges least."""
  v = np.random.default_rng(6).uniform(-1, 1, 200_000)
  for bits in (4, 8):
    assert q.calibrate_clip("kl", v, bits, True) == pytest.approx(np.abs(v).max(), rel=1e-12)


def test_kl_keeps_the_exact_zeros_of_a_relu_in_the_middle_bin():
  v, _ = TENSORS["relu_input"]
  s = clip_rules.summarize(v, False, ["kl"])
  counts, edges = s.kl
  assert counts[:500].sum() == 0  # nothing left of the middle bin
  assert counts[500] == np.sum(np.maximum(v, 0) < edges[501]) > np.sum(v <= 0)
  assert edges[0] == pytest.approx(-v.max()) and edges[-1] == pytest.approx(v.max())


def test_mse_finds_the_known_optimum_of_uniform_data_with_an_outlier():
  """Uniform data on [-1, 1] plus one outlier at 10: cutting the outlier costs far less than
  coarse steps for everything else, so the best clip sits near 1 (brute force over the
  exact data, not the histogram, agrees to one candidate step)."""
  rng = np.random.default_rng(2)
  v = np.concatenate([rng.uniform(-1, 1, 100_000), [10.0]])
  clip = q.calibrate_clip("mse", v, 4, True)
  candidates = np.arange(1, 100) / 100 * 10.0
  exact = [np.mean((v - clip_rules.quantize(v, c, 4, True)) ** 2) for c in candidates]
  assert abs(clip - candidates[int(np.argmin(exact))]) <= 0.1 + 1e-9
  assert 0.8 <= clip <= 1.3


def test_aciq_and_kl_clip_below_the_max_for_heavy_tails():
  v = np.maximum(np.random.default_rng(4).laplace(size=100_000), 0)
  for method in ("aciq", "kl"):
    assert 0 < q.calibrate_clip(method, v, 4, False) < v.max()


# ---- degenerate tensors ------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed,value", [(True, -0.3), (True, 0.3), (False, 0.3)])
def test_constant_tensor(bits, signed, value):
  """All mass sits on one point c (|c| = m). max: m. mse: every candidate k/100 m < m clips
  it, at cost (m - alpha)^2, so 0.99 m; ft the same (0.99 m > 0.5 m). aciq: both spreads
  are 0, no usable candidate, so m (exact). kl, c > 0: the mass is in the last of the 1001
  bins, which every slice either leaves out or holds as its own last bin, where q never
  spreads (the quirk): every q is empty, every divergence infinite, and the first
  candidate's threshold (slice half-width Qb//2) is chosen, as the reference code does.
  kl, c < 0: the mass is in the first bin; only the full slice holds it, in its first group,
  where q equals p (divergence 0): threshold m. (Thresholds are histogram edges, in the
  tensor's float32.)"""
  v = np.full(50, value, np.float32)
  m = abs(np.float32(value))
  assert q.calibrate_clip("max", v, bits, signed) == m
  assert q.calibrate_clip("mse", v, bits, signed) == pytest.approx(0.99 * m, rel=1e-12)
  assert q.calibrate_clip("ft", v, bits, signed) == pytest.approx(0.99 * m, rel=1e-12)
  assert q.calibrate_clip("aciq", v, bits, signed) == m
  first_threshold = -m + (501 + (2**bits - 1) // 2) * (2 * m / 1001)
  expected_kl = m if value < 0 else first_threshold
  assert q.calibrate_clip("kl", v, bits, signed) == pytest.approx(expected_kl, rel=1e-5)


@pytest.mark.parametrize("method", q.CALIBRATIONS)
@pytest.mark.parametrize("values,signed", [(np.zeros(20), True), (np.zeros(20), False),
                                           (-np.arange(1.0, 21.0), False)])
def test_nothing_to_quantize_gives_the_tiny_clip(method, values, signed):
  assert q.calibrate_clip(method, values, 4, signed) == clip_rules.TINY_CLIP


def test_unknown_calibration_is_rejected():
  with pytest.raises(ValueError, match="unknown"):
    q.calibrate_clip("percentile", np.ones(3), 4, True)


# ---- a whole student ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_and_batches():
  model = CifarResNet(20)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  batches = [jax.random.normal(jax.random.key(i), (8, 32, 32, 3)) for i in (1, 2)]
  return variables, batches


@pytest.mark.parametrize("protocol", q.PROTOCOLS)
@pytest.mark.parametrize("method", q.CALIBRATIONS)
def test_student_clips_are_the_rules_on_kernels_and_the_batch_mean_on_relu_inputs(
    teacher_and_batches, method, protocol):
  """Weight clips: the rule on the kernel (8 bits for the first conv and the dense layer
  under dfqf); activation clips: the mean over batches of the rule on the ReLU's *input*,
  recorded from the full-precision teacher (BNs in inference mode)."""
  teacher_vars, batches = teacher_and_batches
  spec = q.QuantSpec(3, 4, protocol)
  summaries = calibration.summarize(teacher_vars, 20, 10, batches, [method])
  _, student = calibration.quantized_student(teacher_vars, 20, 10, spec)
  student = calibration.calibrate(student, spec, method, summaries)

  def relu_inputs(x):
    """The input of bn2 + shortcut -> ReLU of block layer2_1, and of the stem ReLU."""
    _, state = CifarResNet(20).apply(teacher_vars, x, capture_intermediates=True,
                                     mutable=["intermediates"])
    inter = state["intermediates"]
    block_in = inter["layer2_0"]["__call__"][0]
    bn2 = inter["layer2_1"]["bn2"]["__call__"][0]
    stem = inter["bn1"]["__call__"][0]
    return np.asarray(bn2 + block_in), np.asarray(stem)

  block_inputs, stem_inputs = zip(*map(relu_inputs, batches))
  assert min(x.min() for x in block_inputs) < 0  # the input, not the ReLU's output
  params = student["params"]
  np.testing.assert_allclose(
      params["layer2_1"]["act2"]["act_clip"],
      np.mean([q.calibrate_clip(method, x, 4, False) for x in block_inputs]), rtol=1e-6)
  if protocol == "standard":
    assert "weight_clip" not in params["layer1_0"]["conv1"]  # per-channel min/max weights
    np.testing.assert_allclose(
        params["act1"]["act_clip"],
        np.mean([q.calibrate_clip(method, x, 4, False) for x in stem_inputs]), rtol=1e-6)
  else:
    assert "act1" not in params  # the stem ReLU stays float
    for layer, bits in ((("conv1",), 8), (("linear",), 8), (("layer3_2", "conv2"), 3)):
      node_t, node_s = teacher_vars["params"], params
      for key in layer:
        node_t, node_s = node_t[key], node_s[key]
      np.testing.assert_allclose(node_s["weight_clip"], q.calibrate_clip(
          method, np.asarray(node_t["kernel"]), bits, True), rtol=1e-6)


@pytest.mark.parametrize("images, data, said", [
    ("dfqf", "generated", "on 1,280 generated images"),
    ("zeroq", "generated", "on 1,280 ZeroQ's distilled images"),
    ("gdfq", "generated", "on 1,280 GDFQ's generated images"),
    ("zeroq", "real", "on 1,280 real images")])
def test_the_calibration_line_names_the_images_it_reads(capsys, images, data, said):
  config = finetune.get_config("w4a4")
  config.images, config.calibration_data = images, data
  calibration.announce("student_w4a4", config, ["ft"])
  assert capsys.readouterr().err == f"student_w4a4: calibrating the ft clips {said}\n"
