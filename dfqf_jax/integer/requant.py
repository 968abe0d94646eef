"""Requantization: each conv's int32 accumulator rescaled into the next tensor's codes.

Each conv's output is rescaled per channel into the next tensor's units,
with the folded BN: t = acc * M + B, M = step_in * s * bn_scale / step_out,
B = bn_bias / step_out; in a residual block's second conv the shortcut is added in the same
units, t += r * K with r the shortcut's codes and K = step_x / step_out (option-A shortcut:
subsample by 2, zero-pad channels, done on the codes); then codes_out =
clip(round_half_even(t), 0, 2^ba - 1), which is ReLU + fake quantization in one (round is
monotone and round(0) = 0). M, B and K are computed once at export in float64 (and stored
so). Where acc and r are integers (every conv with integer input codes and, for a residual
conv, an integer shortcut) this step is exact and integer-only (`requant_tables`,
`exact_requantize`): per channel, int32 thresholds for each output code, derived in float64
from M, B and K, and a b-step binary search. Exact means: the code a real-number evaluation
of t gives (to float64 precision), independent of how a compiler fuses the program. A
float32 `acc * M + B` instead rounds t's near-ties (a value 2e-7 below 5.5 became 6) and
made 0.13% of the budget W4A4 student's predictions differ.
"""
import jax.numpy as jnp
import numpy as np

from dfqf_jax import checkpoints
from dfqf_jax import quant as q

TABLES = ("sign", "threshold_high", "threshold_low", "threshold_fraction", "shortcut_high",
          "shortcut_low", "shortcut_fraction")  # requant_tables' (derived, never stored)
LIMB = 2**28  # the requantization tables' integers are high * LIMB + low
FRACTION_ONE = 2**31  # and their fractions multiples of 1 / FRACTION_ONE


def requant_params(graph: dict, arrays: dict) -> dict:
  """The rescaling constants after each accumulation, float64, from the stored scales,
  folded BN and steps:
    L.multiplier  (per channel) M = step_in * s * bn_scale / step_out (step_in = 1 for a
                  float input, step_out = 1 for a float output; the dense layer:
                  step_in * s / (H W))
    L.offset      (per channel) B = bn_bias / step_out
    L.shortcut_multiplier  K = step_x / step_out for a residual input x (step_x = 1 if float).
  The layers of `exact_layers` use them only through `requant_tables` (exact); the others
  multiply by them rounded to float32."""
  steps = {"input": None}
  for layer in graph["layers"]:
    if layer["op"] == "conv":
      steps[layer["output"]] = (np.float64(arrays[f"{layer['name']}.act_step"])
                                if layer["act_bits"] else None)
  one = lambda step: np.float64(1.0) if step is None else step
  result = {}
  for layer in graph["layers"]:
    name, step_in = layer["name"], one(steps[layer["input"]])
    scale = np.asarray(arrays[f"{name}.scale"], np.float64)
    if layer["op"] == "mean_dense":
      multiplier = step_in * scale / layer["pool_positions"]
      result[f"{name}.multiplier"] = np.broadcast_to(multiplier, (layer["shape"][-1],))
      continue
    step_out = one(steps[layer["output"]])
    result[f"{name}.multiplier"] = (step_in * scale * np.asarray(
        arrays[f"{name}.bn_scale"], np.float64) / step_out)
    result[f"{name}.offset"] = np.asarray(arrays[f"{name}.bn_bias"], np.float64) / step_out
    if layer.get("shortcut"):
      result[f"{name}.shortcut_multiplier"] = one(steps[layer["shortcut"]["input"]]) / step_out
  return {k: np.asarray(v, np.float64) for k, v in result.items()}


def exact_layers(graph: dict) -> dict:
  """name -> bits of the shortcut's codes (0 without a shortcut) for the conv layers whose
  requantization is exact: integer input codes, integer output codes, and a shortcut (if
  any) of integer codes."""
  code_bits = {layer["output"]: layer["act_bits"] for layer in graph["layers"]
               if layer["op"] == "conv" and layer["act_bits"]}
  result = {}
  for layer in graph["layers"]:
    shortcut = layer.get("shortcut")
    if (layer["op"] == "conv" and layer["act_bits"] and layer["input"] in code_bits
        and (not shortcut or shortcut["input"] in code_bits)):
      result[layer["name"]] = code_bits[shortcut["input"]] if shortcut else 0
  return result


def _split(x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """x = high * 2^28 + low + fraction / 2^31 (to 2^-31), with low in [0, 2^28) and fraction
  in [0, 2^31): three int32 arrays."""
  whole = np.floor(x)
  if not np.all(np.abs(whole) < 2.0**52):
    raise checkpoints.CheckpointError(
        f"{what} needs a requantization threshold of {np.abs(whole).max():.3g} accumulator "
        "units, beyond float64's integers (a channel whose rescale multiplier is almost but "
        "not exactly zero); this model cannot be exported exactly.")
  high = np.floor(whole / LIMB)
  fraction = np.minimum(np.floor((x - whole) * FRACTION_ONE), FRACTION_ONE - 1)
  return high.astype(np.int32), (whole - high * LIMB).astype(np.int32), fraction.astype(np.int32)


def requant_tables(graph: dict, arrays: dict) -> dict:
  """The int32 tables that make the requantization of `exact_layers` exact, derived (never
  stored) from the float64 constants of `requant_params`. For output code k (1..2^b - 1),
  code >= k iff t = acc * M + r * K + B >= k - 1/2 (round half to even of t, clipped to
  [0, 2^b - 1], counts the k below it; exact halves have measure zero and go up). Divided by
  u = |M| (u = 1 if M == 0), with sigma = sign(M):
      sigma * acc + r * (K / u) >= (k - 1/2 - B) / u.
  Both sides are split into integer and fractional parts, r * K / u = m_r + f_r and
  (k - 1/2 - B) / u = n_k + g_k (fractions in [0, 1), as multiples of 2^-31), so the test is
  i > 0 or (i == 0 and f_r >= g_k) with the integer i = sigma * acc + m_r - n_k. m_r and n_k
  are huge where |M| is tiny (the real teacher has channels with |M| ~ 1e-8), so each is held
  in two limbs, high * 2^28 + low, and i is formed as clip(high_r - high_k, -2, 2) * 2^28 +
  (sigma * acc + low_r - low_k): |acc| < 2^26, so this is int32 and has i's sign and zeros.
    L.sign (C,);
    L.threshold_{high,low,fraction} (2^b - 1, C): n_k and g_k for each output code k;
    L.shortcut_{high,low,fraction} (2^b_x, C): m_r and f_r for each shortcut code r."""
  layers = {layer["name"]: layer for layer in graph["layers"]}
  tables = {}
  for name, shortcut_bits in exact_layers(graph).items():
    layer = layers[name]
    multiplier = np.asarray(arrays[f"{name}.multiplier"], np.float64)
    unit = np.where(multiplier == 0, 1.0, np.abs(multiplier))
    levels = np.arange(1, q.unsigned_range(layer["act_bits"])[1] + 1, dtype=np.float64)
    boundaries = (levels[:, None] - 0.5 - arrays[f"{name}.offset"]) / unit
    tables[f"{name}.sign"] = np.sign(multiplier).astype(np.int32)
    for part, value in zip(("high", "low", "fraction"), _split(boundaries, name)):
      tables[f"{name}.threshold_{part}"] = value
    if shortcut_bits:
      codes = np.arange(2**shortcut_bits, dtype=np.float64)[:, None]
      shortcut = codes * arrays[f"{name}.shortcut_multiplier"] / unit
      for part, value in zip(("high", "low", "fraction"), _split(shortcut, name)):
        tables[f"{name}.shortcut_{part}"] = value
  return tables


def is_table(key: str) -> bool:
  return key.rsplit(".", 1)[-1] in TABLES


def _per_channel(table, index):
  """table[index[..., c], c] for a (rows, C) table and int32 indices (..., C)."""
  channels = table.shape[1]
  return jnp.take(table.reshape(-1), index * channels + jnp.arange(channels), mode="clip")


def exact_requantize(acc, arrays: dict, name: str, bits: int, shortcut=None):
  """clip(round(acc * M + shortcut * K + B), 0, 2^bits - 1) per channel with int32
  operations only (`requant_tables`): a bits-step binary search for the largest code k whose
  threshold is reached. acc, shortcut: int32 (shortcut: codes, or None)."""
  table = {part: jnp.asarray(arrays[f"{name}.{part}"], jnp.int32) for part in TABLES
           if f"{name}.{part}" in arrays}
  low = acc * table["sign"]
  high = fraction = jnp.zeros((), jnp.int32)
  if shortcut is not None:
    high = _per_channel(table["shortcut_high"], shortcut)
    low = low + _per_channel(table["shortcut_low"], shortcut)
    fraction = _per_channel(table["shortcut_fraction"], shortcut)
  codes = jnp.zeros_like(low)
  for bit in reversed(range(bits)):
    candidate = codes + (1 << bit)
    threshold = {part: _per_channel(table[f"threshold_{part}"], candidate - 1)
                 for part in ("high", "low", "fraction")}
    i = jnp.clip(high - threshold["high"], -2, 2) * LIMB + low - threshold["low"]
    reached = (i > 0) | ((i == 0) & (fraction >= threshold["fraction"]))
    codes = jnp.where(reached, candidate, codes)
  return codes
