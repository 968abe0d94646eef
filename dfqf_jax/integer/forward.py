"""The integer forward pass of an exported graph.

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
"""
import json

import jax
import jax.numpy as jnp

from dfqf_jax import quant as q
from dfqf_jax.integer.format import signed_codes
from dfqf_jax.integer.requant import exact_requantize
from dfqf_jax.models.resnet import option_a_shortcut

DIMS = ("NHWC", "HWIO", "NHWC")


def _weight_operand(arrays, name: str, bits: int):
  """(w8 int8, dz int32 per channel or None) with w_int = w8 + dz (see the docstring)."""
  codes = jnp.asarray(arrays[f"{name}.codes"], jnp.int32)
  if signed_codes(arrays, name):
    return codes.astype(jnp.int8), None
  zero_point = jnp.asarray(arrays[f"{name}.zero_point"], jnp.int32)
  if bits < 8:
    return (codes - zero_point).astype(jnp.int8), None
  return (codes - 128).astype(jnp.int8), 128 - zero_point


def _w_int(arrays, name: str):
  codes = jnp.asarray(arrays[f"{name}.codes"], jnp.int32)
  if not signed_codes(arrays, name):
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


def apply_layer(layer: dict, arrays: dict, env: dict) -> tuple:
  """One layer of the graph: reads its input (and shortcut) tensors from `env` (name ->
  (kind 'float' | 'codes', value, step, bits)) and returns its output tensor likewise."""
  name = layer["name"]
  f32 = lambda k: jnp.asarray(arrays[k], jnp.float32)
  kind, value, _, bits_in = env[layer["input"]]
  if layer["op"] == "mean_dense":
    if kind != "codes" or value.shape[1] * value.shape[2] != layer["pool_positions"]:
      raise ValueError(f"{name} needs {layer['pool_positions']} positions of activation codes.")
    total = value.sum((1, 2))  # int32, exact: the pooled features times H * W / step
    acc = jax.lax.dot(total, _w_int(arrays, name), preferred_element_type=jnp.int32)
    logits = acc.astype(jnp.float32) * f32(f"{name}.multiplier") + f32(f"{name}.bias")
    return "float", logits, None, None
  shortcut = None
  if layer.get("shortcut"):
    _, shortcut, _, _ = env[layer["shortcut"]["input"]]
    shortcut = option_a_shortcut(shortcut, layer["shape"][-1], layer["shortcut"]["stride"])
  if kind == "codes":
    w8, dz = _weight_operand(arrays, name, layer["weight_bits"])
    acc = integer_conv(value, bits_in, w8, dz, layer["stride"])
    if f"{name}.threshold_low" in arrays:  # integer codes in and out: exact
      return ("codes", exact_requantize(acc, arrays, name, layer["act_bits"], shortcut),
              f32(f"{name}.act_step"), layer["act_bits"])
    acc = acc.astype(jnp.float32)
  else:  # float input: float conv of the integer codes (the scale is in the multiplier)
    w = _w_int(arrays, name).astype(jnp.float32)
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
    env[layer["output"]] = apply_layer(layer, arrays, env)
  return env["logits"][1]


class IntegerResNet:
  """A model object for `classifiers.top1_percent`: `apply(arrays, x, train=False)` -> logits.
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
