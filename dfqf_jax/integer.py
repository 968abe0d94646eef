"""Integer deployment of a fake-quantized CIFAR ResNet: export format and integer forward.

Export format (a folder, see `save` / `load`)
---------------------------------------------
`model.json`  the graph: input normalization, protocol and bit widths, and the layers in
              execution order (name, op, input/output tensor, stride, bit widths, residual
              input), plus the dtype/shape/packing of every array in weights.npz.
`weights.npz` per conv/dense layer `L`: `L.codes` integer weight codes (int8 for signed
              codes, uint8 for the standard protocol's unsigned ones; 4 bits and fewer packed
              two per byte, low nibble first, row-major, two's complement for signed codes),
              `L.scale` (float32: one per tensor, or one per output channel), `L.zero_point`
              (standard protocol, int32 per output channel), `L.bn_scale` / `L.bn_bias`
              (batch norm folded: bn(z) = z * bn_scale + bn_bias per channel, computed in
              float64 from the running statistics, stored float64), `L.bias` (dense), and
              for a layer whose ReLU output is quantized `L.act_clip` / `L.act_step`
              (step = clip / (2^b - 1), float32, as the fake quantizer computes it); and
              the rescaling constants the forward pass uses, `L.multiplier`, `L.offset`,
              `L.shortcut_multiplier` (float64, see `requant_params`; `load` checks that
              they follow from the arrays above and derives the integer requantization
              tables from them, `requant_tables`).
`model.stablehlo` the integer forward below as a `jax.export` artifact (uint8 NHWC images
              in, float32 logits out, any batch size), runnable with JAX alone.

Quantization of the weights is done exactly as `dfqf_jax.quant` does it (float32, round half
to even): protocol 'dfqf' codes n = clip(round(w / s), -2^(b-1), 2^(b-1) - 1) with
s = clip_w / (2^(b-1) - 1), real weight n * s; protocol 'standard' per output channel
s = max(max - min, 1e-8) / (2^b - 1), z = round(-min / s), n = clip(round(w / s) + z, 0,
2^b - 1), real weight (n - z) * s. Activation codes are unsigned, real value a * step.

Integer arithmetic
------------------
A conv whose input is a tensor of activation codes a (integers in [0, 2^ba - 1], zero
padding = code 0 = real 0) computes acc = sum_taps a * w_int exactly in int32 with
`lax.conv_general_dilated(int8, int8, preferred_element_type=int32)`, where w_int = n
(dfqf) or n - z (standard). Operands that do not fit int8 are offset, with exact
corrections:
  * 8-bit activation codes (0..255): the input is zero-padded, shifted by -128 to int8 and
    convolved without padding; acc += 128 * sum(w8 over the kernel) per output channel;
  * standard 8-bit weights (n - z in [-255, 255]): w8 = n - 128 and
    acc += (128 - z) * (window sum of a), the window sum being a conv with a ones kernel.
|acc| <= 9 * 64 * 255 * 255 < 2^26 for every layer of every CIFAR ResNet (64 channels at
most), so int32 never overflows. acc * step_in * s is exactly the real-number conv of the
fake-quantized tensors.

Requantization. Each conv's output is rescaled per channel into the next tensor's units,
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

Where a float32 multiply remains: the layers reading a float tensor (below) compute
t = acc * M + B (+ x * K) in float32 (M, B, K rounded to float32) and round it.

Tensors that a protocol keeps in float, and the layers reading them:
  * the input (both protocols): the stem conv is a float32 conv of the normalized image with
    the integer weight codes as float32 (exact small integers); s goes into M:
    t = conv(x, w_int) * (s * bn_scale / step_out) + B;
  * the stem ReLU output (dfqf only): float relu(conv * s * bn_scale + bn_bias); the first
    block's conv1 reads it with a float32 conv of its weight codes, and its conv2's residual
    adds it in float (t += x * (1 / step_out));
  * the pooled features (both): the mean over the 8x8 positions is never formed; the dense
    layer takes the int32 sum of the last codes S (exact) and computes S @ w_int in int32
    (int32 operands: S <= 64 * 255 does not fit int8), then
    logits = acc * M + bias with M = step_last * s / (H * W), the one float multiply-add of
    the head.
    One unit of acc, step_last * s / (H * W), is the output's quantization step.

Equality with the fake-quantized model: in exact arithmetic every pre-rounding value t above
equals the fake-quant model's (ReLU input / step) and the logits are equal. The integer
layers compute the exact value's codes; the fake-quant model computes t in float32 (a
float32 conv of dequantized values, then BN), ~1e-7 relative off, so where t lies within
that of a half-integer one of its codes differs by one, and the difference propagates to
later layers. The float-input layers (below the requantization) round on both sides.
`layer_by_layer` measures the ties alone (each integer layer fed the fake-quant model's own
input); tests/test_integer.py and dfqf_jax/tools/integer_check.py report both, and
dfqf_jax/tools/rescale_ties.py compares with the fake-quant model run in float64.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dfqf_jax import checkpoints, storage
from dfqf_jax import quant as q
from dfqf_jax.models.resnet import blocks_per_stage

FORMAT = "dfqf-jax integer model"
VERSION = 2  # 2: float64 folded BN and rescale constants, exact requantization
GRAPH_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
STABLEHLO_FILE = "model.stablehlo"
BN_EPSILON = 1e-5  # dfqf_jax.models.layers.BatchNorm
POOL_POSITIONS = 64  # 8 x 8 positions averaged before the dense layer (32 x 32 inputs)
PACK_BITS = 4  # codes of this many bits or fewer are stored two per byte
DIMS = ("NHWC", "HWIO", "NHWC")
TABLES = ("sign", "threshold_high", "threshold_low", "threshold_fraction", "shortcut_high",
          "shortcut_low", "shortcut_fraction")  # requant_tables' (derived, never stored)
LIMB = 2**28  # the requantization tables' integers are high * LIMB + low
FRACTION_ONE = 2**31  # and their fractions multiples of 1 / FRACTION_ONE


# ---------------------------------------------------------------------------------------
# Export: fake-quantized variables -> graph + integer codes
# ---------------------------------------------------------------------------------------
def weight_codes(kernel, clip, bits: int, protocol: str) -> dict:
  """Integer codes of a kernel (output channels last) exactly as `dfqf_jax.quant` rounds it:
  {'codes', 'scale'} (+ 'zero_point' for the standard protocol), NumPy."""
  w = jnp.asarray(kernel, jnp.float32)
  if protocol == "standard":
    axes = tuple(range(w.ndim - 1))
    w_min = jnp.minimum(w.min(axes), 0.0)
    w_max = jnp.maximum(w.max(axes), 0.0)
    q_max = 2**bits - 1
    scale = jnp.maximum(w_max - w_min, 1e-8) / q_max
    zero_point = jnp.round(-w_min / scale)
    codes = jnp.clip(jnp.round(w / scale) + zero_point, 0, q_max)
    return {"codes": np.asarray(codes, np.int32), "scale": np.asarray(scale, np.float32),
            "zero_point": np.asarray(zero_point, np.int32)}
  q_min, q_max = q.signed_range(bits)
  step = jnp.asarray(clip, jnp.float32) / q_max
  codes = jnp.clip(jnp.round(w / step), q_min, q_max)
  return {"codes": np.asarray(codes, np.int32), "scale": np.asarray(step, np.float32)}


def act_step(clip, bits: int) -> np.float32:
  """The activation step as the fake quantizer computes it (float32 clip / q_max)."""
  return np.float32(np.float32(clip) / np.float32(q.unsigned_range(bits)[1]))


def fold_bn(bn: dict, stats: dict) -> dict:
  """bn(z) = (z - mean) / sqrt(var + eps) * scale + bias = z * bn_scale + bn_bias."""
  g = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64)
                                                     + BN_EPSILON)
  b = np.asarray(bn["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * g
  return {"bn_scale": g, "bn_bias": b}


def check_exportable(spec: q.QuantSpec | None, what: str) -> None:
  if spec is None:
    raise checkpoints.CheckpointError(
        f"{what} is not a quantized model (its checkpoint has no quantization spec); export "
        "a student or PTQ model (e.g. --config.student=student_w4a4).")
  if q.FULL_PRECISION_BITS in (spec.weight_bits, spec.act_bits):
    raise checkpoints.CheckpointError(
        f"{what} has W{spec.weight_bits}A{spec.act_bits}: 32-bit (float) weights or "
        "activations have no integer codes; only models with 2..8-bit weights and "
        "activations export.")


def build(variables: dict, spec: q.QuantSpec, depth: int, num_classes: int) -> tuple:
  """(graph, arrays) of a fake-quantized CifarResNet's variables; arrays are unpacked."""
  check_exportable(spec, "this model")
  params, stats = variables["params"], variables["batch_stats"]
  graph = {"protocol": spec.protocol, "weight_bits": spec.weight_bits,
           "act_bits": spec.act_bits, "edge_weight_bits": spec.weight_bits_of("conv1"),
           "depth": depth, "num_classes": num_classes, "layers": []}
  arrays = {}

  def conv(name, p, bn, s, stride, input_, output, act=None, shortcut=None):
    bits = spec.weight_bits_of(name.replace(".", "/"))
    codes = weight_codes(p["kernel"], p.get(q.WEIGHT_CLIP), bits, spec.protocol)
    arrays.update({f"{name}.{k}": v for k, v in codes.items()})
    arrays.update({f"{name}.{k}": v for k, v in fold_bn(bn, s).items()})
    layer = {"name": name, "op": "conv", "input": input_, "output": output, "stride": stride,
             "weight_bits": bits, "shape": list(np.shape(p["kernel"])),
             "act_bits": None, "shortcut": shortcut}
    if act is not None:
      layer["act_bits"] = spec.act_bits
      arrays[f"{name}.act_clip"] = np.float32(act[q.ACT_CLIP])
      arrays[f"{name}.act_step"] = act_step(act[q.ACT_CLIP], spec.act_bits)
    graph["layers"].append(layer)

  conv("conv1", params["conv1"], params["bn1"], stats["bn1"], 1,
       "input", "stem", params.get("act1") if spec.quantize_stem_activation else None)
  x, channels = "stem", 16
  for stage, features in enumerate((16, 32, 64)):
    for block in range(blocks_per_stage(depth)):
      stride = 2 if stage > 0 and block == 0 else 1
      b = f"layer{stage + 1}_{block}"
      p, s = params[b], stats[b]
      conv(f"{b}.conv1", p["conv1"], p["bn1"], s["bn1"], stride, x,
           f"{b}.act1", p["act1"])
      conv(f"{b}.conv2", p["conv2"], p["bn2"], s["bn2"], 1, f"{b}.act1",
           f"{b}.act2", p["act2"], shortcut={"input": x, "stride": stride,
                                             "in_channels": channels})
      x, channels = f"{b}.act2", features
  head_bits = spec.weight_bits_of("linear")
  codes = weight_codes(params["linear"]["kernel"], params["linear"].get(q.WEIGHT_CLIP),
                       head_bits, spec.protocol)
  arrays.update({f"linear.{k}": v for k, v in codes.items()})
  arrays["linear.bias"] = np.asarray(params["linear"]["bias"], np.float32)
  graph["layers"].append({"name": "linear", "op": "mean_dense", "input": x, "output": "logits",
                          "weight_bits": head_bits,
                          "shape": list(np.shape(params["linear"]["kernel"])),
                          "pool_positions": POOL_POSITIONS})
  arrays.update(requant_params(graph, arrays))
  return graph, {**arrays, **requant_tables(graph, arrays)}


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
  tables = {}
  for name, shortcut_bits in exact_layers(graph).items():
    layer = _layer(graph, name)
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


def _is_table(key: str) -> bool:
  return key.rsplit(".", 1)[-1] in TABLES


# ---------------------------------------------------------------------------------------
# Storage: packing, save, load (with checks)
# ---------------------------------------------------------------------------------------
def _code_range(bits: int, protocol: str) -> tuple[int, int]:
  return q.unsigned_range(bits) if protocol == "standard" else q.signed_range(bits)


def pack(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
  """Codes of <= 4 bits, two per byte (low nibble first, row-major); else int8/uint8."""
  flat = np.asarray(codes, np.int64).ravel()
  if bits > PACK_BITS:
    return flat.reshape(codes.shape).astype(np.int8 if signed else np.uint8)
  nibbles = (flat & 0xF).astype(np.uint8)
  if nibbles.size % 2:
    nibbles = np.append(nibbles, np.uint8(0))
  return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack(stored: np.ndarray, bits: int, signed: bool, shape) -> np.ndarray:
  size = int(np.prod(shape))
  if bits > PACK_BITS:
    return np.asarray(stored, np.int32).reshape(shape)
  stored = np.asarray(stored, np.uint8)
  nibbles = np.stack([stored & 0xF, stored >> 4], -1).ravel()[:size].astype(np.int32)
  if signed:
    nibbles = np.where(nibbles >= 8, nibbles - 16, nibbles)
  return nibbles.reshape(shape)


def save(folder: str, graph: dict, arrays: dict) -> dict:
  """Writes model.json and weights.npz into `folder` (which must exist); returns the graph
  as written (with the array descriptions)."""
  stored = stored_arrays(graph, arrays)
  described = {}
  for key, value in sorted(stored.items()):
    described[key] = {"dtype": str(value.dtype), "shape": list(value.shape)}
    if key.endswith(".codes"):
      bits = _layer(graph, key.rsplit(".", 1)[0])["weight_bits"]
      described[key].update(bits=bits, packed=bits <= PACK_BITS)
  graph = {"format": FORMAT, "version": VERSION, **graph, "arrays": described}
  with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
    np.savez(f, **stored)
  with open(os.path.join(folder, GRAPH_FILE), "w") as f:
    json.dump(graph, f, indent=1)
  return graph


def _layer(graph: dict, name: str) -> dict:
  return next(layer for layer in graph["layers"] if layer["name"] == name)


def load(folder: str) -> tuple[dict, dict]:
  """(graph, arrays with unpacked int32 codes) of an exported folder, checked: every array
  present with its declared dtype and shape, codes packed and ranged for the declared bits."""
  path = os.path.join(folder, GRAPH_FILE)
  try:
    graph = json.loads(storage.read_text(path))
    with storage.open_file(os.path.join(folder, WEIGHTS_FILE), "rb") as f, np.load(f) as npz:
      stored = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"the export {folder!r} cannot be read ({type(e).__name__}: {e}); it is incomplete: "
        "rerun the export stage.") from e
  if graph.get("format") != FORMAT or graph.get("version") != VERSION:
    raise checkpoints.CheckpointError(
        f"{path!r} is not a {FORMAT} of version {VERSION} (it says {graph.get('format')!r}, "
        f"version {graph.get('version')!r}); export the student again (configs/export.py).")
  signed = graph["protocol"] != "standard"
  arrays = {}
  for key, desc in graph["arrays"].items():
    if key not in stored:
      raise checkpoints.CheckpointError(f"the export {folder!r} lacks the array {key!r}; "
                                        "rerun the export stage.")
    value = stored[key]
    if key.endswith(".codes"):
      layer = _layer(graph, key.rsplit(".", 1)[0])
      bits = layer["weight_bits"]
      expected = pack(np.zeros(layer["shape"], np.int32), bits, signed)
      lo, hi = _code_range(bits, graph["protocol"])
      codes = None
      if value.dtype == expected.dtype and value.shape == expected.shape:
        codes = unpack(value, bits, signed, layer["shape"])
      if codes is None or codes.min() < lo or codes.max() > hi:
        raise checkpoints.CheckpointError(
            f"the export {folder!r} declares {bits}-bit weights for {layer['name']} "
            f"(W{graph['weight_bits']}A{graph['act_bits']}, {graph['protocol']}) but its "
            f"codes are {value.dtype}{list(value.shape)}"
            + ("" if codes is None else f" in [{codes.min()}, {codes.max()}]")
            + f", not {expected.dtype}{list(expected.shape)} in [{lo}, {hi}]: the weights "
            "come from another bit width; rerun the export stage.")
      value = codes
    elif str(value.dtype) != desc["dtype"] or list(value.shape) != desc["shape"]:
      raise checkpoints.CheckpointError(
          f"the export {folder!r} has {key} as {value.dtype}{list(value.shape)}, but "
          f"{GRAPH_FILE} says {desc['dtype']}{desc['shape']}; rerun the export stage.")
    arrays[key] = value
  for layer in graph["layers"]:
    if layer.get("act_bits"):
      step = act_step(arrays[f"{layer['name']}.act_clip"], layer["act_bits"])
      if step != arrays[f"{layer['name']}.act_step"]:
        raise checkpoints.CheckpointError(
            f"the export {folder!r} has an activation step for {layer['name']} that is not "
            f"clip / (2^{layer['act_bits']} - 1): the activations come from another bit "
            "width; rerun the export stage.")
  for key, value in requant_params(graph, arrays).items():
    if not np.array_equal(value, arrays.get(key)):
      raise checkpoints.CheckpointError(
          f"the export {folder!r} has {key} that does not follow from its scales, batch norm "
          f"and steps; the arrays come from different models or another bit width: rerun "
          "the export stage.")
  return graph, {**arrays, **requant_tables(graph, arrays)}


# ---------------------------------------------------------------------------------------
# The integer forward pass
# ---------------------------------------------------------------------------------------
def _weight_operand(arrays, name: str, bits: int, protocol: str):
  """(w8 int8, dz int32 per channel or None) with w_int = w8 + dz (see the docstring)."""
  codes = jnp.asarray(arrays[f"{name}.codes"], jnp.int32)
  if protocol != "standard":
    return codes.astype(jnp.int8), None
  zero_point = jnp.asarray(arrays[f"{name}.zero_point"], jnp.int32)
  if bits < 8:
    return (codes - zero_point).astype(jnp.int8), None
  return (codes - 128).astype(jnp.int8), 128 - zero_point


def _w_int(arrays, name: str, protocol: str):
  codes = jnp.asarray(arrays[f"{name}.codes"], jnp.int32)
  if protocol == "standard":
    codes = codes - jnp.asarray(arrays[f"{name}.zero_point"], jnp.int32)
  return codes


def _conv(x, w, stride: int, padding, out_dtype):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DIMS,
                                      preferred_element_type=out_dtype)


def integer_conv(codes, act_bits: int, w8, dz, stride: int):
  """sum over the 3x3 taps of codes * (w8 + dz), exact, int32. codes: int32 in
  [0, 2^act_bits - 1]; int8 x int8 convolutions with int32 accumulation."""
  offset = 128 if act_bits == 8 else 0
  if offset:
    a8 = (jnp.pad(codes, ((0, 0), (1, 1), (1, 1), (0, 0))) - offset).astype(jnp.int8)
    padding = ((0, 0), (0, 0))
  else:
    a8 = codes.astype(jnp.int8)
    padding = ((1, 1), (1, 1))
  acc = _conv(a8, w8, stride, padding, jnp.int32)
  if offset:
    acc = acc + offset * w8.astype(jnp.int32).sum((0, 1, 2))
  if dz is not None:
    ones = jnp.ones((3, 3, codes.shape[-1], 1), jnp.int8)
    window = _conv(a8, ones, stride, padding, jnp.int32) + offset * 9 * codes.shape[-1]
    acc = acc + window * dz
  return acc


def option_a_shortcut(x, features: int, stride: int):
  if stride == 1 and x.shape[-1] == features:
    return x
  x = x[:, ::stride, ::stride, :]
  pad = (features - x.shape[-1]) // 2
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, features - x.shape[-1] - pad)))


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


def apply_layer(layer: dict, arrays: dict, protocol: str, env: dict) -> tuple:
  """One layer of the graph: reads its input (and shortcut) tensors from `env` (name ->
  (kind 'float' | 'codes', value, step, bits)) and returns its output tensor likewise."""
  name = layer["name"]
  f32 = lambda k: jnp.asarray(arrays[k], jnp.float32)
  kind, value, _, bits_in = env[layer["input"]]
  if layer["op"] == "mean_dense":
    if kind != "codes" or value.shape[1] * value.shape[2] != layer["pool_positions"]:
      raise ValueError(f"{name} needs {layer['pool_positions']} positions of activation codes.")
    total = value.sum((1, 2))  # int32, exact: the pooled features times H * W / step
    acc = jax.lax.dot(total, _w_int(arrays, name, protocol), preferred_element_type=jnp.int32)
    logits = acc.astype(jnp.float32) * f32(f"{name}.multiplier") + f32(f"{name}.bias")
    return "float", logits, None, None
  shortcut = None
  if layer.get("shortcut"):
    _, shortcut, _, _ = env[layer["shortcut"]["input"]]
    shortcut = option_a_shortcut(shortcut, layer["shape"][-1], layer["shortcut"]["stride"])
  if kind == "codes":
    w8, dz = _weight_operand(arrays, name, layer["weight_bits"], protocol)
    acc = integer_conv(value, bits_in, w8, dz, layer["stride"])
    if f"{name}.threshold_low" in arrays:  # integer codes in and out: exact
      return ("codes", exact_requantize(acc, arrays, name, layer["act_bits"], shortcut),
              f32(f"{name}.act_step"), layer["act_bits"])
    acc = acc.astype(jnp.float32)
  else:  # float input: float conv of the integer codes (the scale is in the multiplier)
    w = _w_int(arrays, name, protocol).astype(jnp.float32)
    acc = _conv(value, w, layer["stride"], ((1, 1), (1, 1)), jnp.float32)
  # float32 rescale, in units of the output step (or real units for a float output):
  # bn(conv) [+ shortcut].
  t = acc * f32(f"{name}.multiplier") + f32(f"{name}.offset")
  if shortcut is not None:
    t = t + shortcut.astype(jnp.float32) * f32(f"{name}.shortcut_multiplier")
  if not layer["act_bits"]:  # float output (the dfqf stem)
    return "float", jax.nn.relu(t), None, None
  q_max = q.unsigned_range(layer["act_bits"])[1]
  codes = jnp.clip(jnp.round(t), 0, q_max).astype(jnp.int32)  # ReLU + requantization
  return "codes", codes, f32(f"{name}.act_step"), layer["act_bits"]


def forward(graph: dict, arrays: dict, x):
  """Logits (float32) of normalized NHWC images `x` with the integer arithmetic above."""
  env = {"input": ("float", jnp.asarray(x, jnp.float32), None, None)}
  for layer in graph["layers"]:
    env[layer["output"]] = apply_layer(layer, arrays, graph["protocol"], env)
  return env["logits"][1]


# ---------------------------------------------------------------------------------------
# Verification against the fake-quantized model, layer by layer
# ---------------------------------------------------------------------------------------
def fake_quant_tensors(model, variables: dict, graph: dict, arrays: dict, x) -> dict:
  """The fake-quantized model's tensors on `x` in the integer graph's terms (name -> (kind,
  value, step, bits)): codes = round(value / step) of each quantized ReLU output (exact:
  the values are codes * step), the float stem output, and the logits."""
  logits, state = model.apply(variables, x, capture_intermediates=True)
  inter = state["intermediates"]
  env = {"input": ("float", jnp.asarray(x, jnp.float32), None, None),
         "logits": ("float", logits, None, None)}
  for layer in graph["layers"][:-1]:
    name = layer["name"]
    if "." in name:  # layerS_B.convK -> the block's actK
      block, conv = name.split(".")
      value = inter[block][conv.replace("conv", "act")]["__call__"][0]
    elif layer["act_bits"]:  # the standard protocol's quantized stem ReLU
      value = inter["act1"]["__call__"][0]
    else:  # the dfqf stem: relu(bn1(...)), relu not a module
      value = jax.nn.relu(inter["bn1"]["__call__"][0])
    if layer["act_bits"]:
      step = jnp.asarray(arrays[f"{name}.act_step"], jnp.float32)
      env[layer["output"]] = ("codes", jnp.round(value / step).astype(jnp.int32), step,
                              layer["act_bits"])
    else:
      env[layer["output"]] = ("float", value, None, None)
  return env


def layer_by_layer(model, variables: dict, graph: dict, arrays: dict, x) -> dict:
  """Each integer layer run on the fake-quantized model's own input tensors, compared with
  its output: name -> {'mismatched': codes that differ, 'total', 'max_code_diff'}; for the
  dense layer `max_logit_diff_units`, the largest |logit difference| / output step. This
  isolates float32 rounding ties from their propagation through later layers."""
  return compare_layers(graph, arrays, fake_quant_tensors(model, variables, graph, arrays, x))


def compare_layers(graph: dict, arrays: dict, env: dict) -> dict:
  """`layer_by_layer` on given tensors `env` (as `fake_quant_tensors` returns them)."""
  last = env[graph["layers"][-1]["input"]][1]
  unit = output_unit(graph, arrays, last.shape[1] * last.shape[2])
  result = {}
  for layer in graph["layers"]:
    kind, value, _, _ = apply_layer(layer, arrays, graph["protocol"], env)
    _, reference, _, _ = env[layer["output"]]
    if kind == "codes":
      diff = jnp.abs(value - reference)
      result[layer["name"]] = {"mismatched": (diff > 0).sum(), "total": diff.size,
                               "max_code_diff": diff.max()}
    elif layer["op"] == "mean_dense":
      result[layer["name"]] = {"max_logit_diff_units": (jnp.abs(value - reference) / unit).max()}
    else:
      result[layer["name"]] = {"max_abs_diff": jnp.abs(value - reference).max()}
  return result


def output_unit(graph: dict, arrays: dict, positions: int = 64):
  """The logits' quantization step per class, step_last * s / (H * W) (H * W = 8 x 8 for
  CIFAR): one unit of the dense layer's int32 accumulator."""
  dense = graph["layers"][-1]
  producer = next(layer for layer in graph["layers"] if layer["output"] == dense["input"])
  step = jnp.asarray(arrays[f"{producer['name']}.act_step"], jnp.float32)
  unit = step * jnp.asarray(arrays[f"{dense['name']}.scale"], jnp.float32) / positions
  return jnp.broadcast_to(unit, (graph["num_classes"],))


def num_params(graph: dict) -> int:
  """Weights and biases of the float model the export came from (conv kernels, BN scale and
  bias, dense kernel and bias); clips not counted."""
  total = 0
  for layer in graph["layers"]:
    total += int(np.prod(layer["shape"]))
    total += layer["shape"][-1] * (2 if layer["op"] == "conv" else 1)
  return total


class IntegerResNet:
  """A model object for `stages.common.top1`: `apply(arrays, x, train=False)` -> logits.
  Hashable by its graph (a jit static argument); the arrays are traced arguments."""

  def __init__(self, graph: dict):
    self.graph_json = json.dumps({k: v for k, v in graph.items() if k != "arrays"},
                                 sort_keys=True)
    self.graph = json.loads(self.graph_json)

  def __hash__(self):
    return hash(self.graph_json)

  def __eq__(self, other):
    return isinstance(other, IntegerResNet) and other.graph_json == self.graph_json

  def apply(self, arrays, x, train: bool = False):
    del train
    return forward(self.graph, arrays, x)


# ---------------------------------------------------------------------------------------
# Portable artifact
# ---------------------------------------------------------------------------------------
def stored_arrays(graph: dict, arrays: dict) -> dict:
  """The arrays as weights.npz stores them: codes int8 / uint8, 4 bits and fewer packed; the
  requantization tables left out (derived)."""
  signed = graph["protocol"] != "standard"
  return {k: pack(v, _layer(graph, k.rsplit(".", 1)[0])["weight_bits"], signed)
          if k.endswith(".codes") else np.asarray(v) for k, v in arrays.items()
          if not _is_table(k)}


def unpack_in_graph(graph: dict, stored: dict) -> dict:
  """`unpack` written in jax.numpy, so that a serialized model keeps its codes packed."""
  signed = graph["protocol"] != "standard"
  arrays = dict(stored)
  for layer in graph["layers"]:
    key, shape = f"{layer['name']}.codes", layer["shape"]
    value = jnp.asarray(stored[key])
    if layer["weight_bits"] > PACK_BITS:
      arrays[key] = value.astype(jnp.int32)
      continue
    nibbles = jnp.stack([value & 0xF, value >> 4], -1).reshape(-1)[:int(np.prod(shape))]
    nibbles = nibbles.astype(jnp.int32)
    if signed:
      nibbles = jnp.where(nibbles >= 8, nibbles - 16, nibbles)
    arrays[key] = nibbles.reshape(shape)
  return arrays


def exported_function(graph: dict, arrays: dict, mean, std):
  """uint8 NHWC images -> logits, with the weights as constants (what gets serialized),
  the codes kept as stored (int8 / uint8, packed) and unpacked inside the program, and the
  requantization tables."""
  stored = stored_arrays(graph, arrays)
  tables = requant_tables(graph, arrays)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def run(images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std  # == dfqf_jax.data.normalize
    return forward(graph, {**unpack_in_graph(graph, stored), **tables}, x)

  return run


def serialize(graph: dict, arrays: dict, mean, std, height: int = 32, width: int = 32,
              channels: int = 3, platforms=("cpu", "cuda", "tpu")) -> bytes:
  """A `jax.export` (StableHLO) artifact of the integer model, batch size symbolic."""
  fn = jax.jit(exported_function(graph, arrays, mean, std))
  shape = jax.export.symbolic_shape(f"b, {height}, {width}, {channels}")
  exported = jax.export.export(fn, platforms=platforms)(jax.ShapeDtypeStruct(shape, jnp.uint8))
  return bytes(exported.serialize())


def deserialize(data: bytes):
  return jax.export.deserialize(bytearray(data))
