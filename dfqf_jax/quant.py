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
import re

import jax
import jax.numpy as jnp

from dfqf_jax import clip_rules

FULL_PRECISION_BITS = 32
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION_BITS)
PROTOCOLS = ("dfqf", "standard")
CALIBRATIONS = tuple(clip_rules.CLIP_RULES)  # max, mse, aciq, kl, ft


def signed_range(bits: int) -> tuple[int, int]:
  """Integer grid of a signed symmetric quantizer: [-2^(b-1), 2^(b-1) - 1]."""
  return clip_rules.integer_range(bits, signed=True)


def unsigned_range(bits: int) -> tuple[int, int]:
  """Integer grid of an unsigned quantizer: [0, 2^b - 1]."""
  return clip_rules.integer_range(bits, signed=False)


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


WEIGHT_CLIP, ACT_CLIP = "weight_clip", "act_clip"  # the learned clip parameters' names


def is_clip(param_path) -> bool:
  """Whether a parameter (path of names, last = the parameter's) is a clip value."""
  return param_path[-1] in (WEIGHT_CLIP, ACT_CLIP)


def parse_bits(text: str) -> list[tuple[int, int]]:
  """'w4a4' or 'w8a8,W4A4' -> [(8, 8), (4, 4)]: any case, each pair once (in order)."""
  pairs = []
  for item in str(text).lower().split(","):
    item = item.strip()
    try:
      w, a = item.removeprefix("w").split("a")
      pairs.append((int(w), int(a)))
    except ValueError:
      raise ValueError(f"bit widths {item!r} are not of the form w<bits>a<bits> (e.g. w4a4)."
                       ) from None
  return list(dict.fromkeys(pairs))


def bits_name(w: int, a: int) -> str:
  """(4, 4) -> 'w4a4', the one spelling of a bit-width pair in names and configs."""
  return f"w{w}a{a}"


@dataclasses.dataclass(frozen=True)
class QuantizationRule:
  """Weights of the layers whose module path ('/'-joined, e.g. 'layer1_0/conv1') fully
  matches the regular expression `module_path` are quantized to `weight_bits`."""
  module_path: str
  weight_bits: int


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which tensors of a ResNet are fake-quantized, and at which widths.

  protocol 'dfqf' (the reference code): per-tensor symmetric weight clips, first conv and
  last dense at `first_last_weight_bits`, activations after both ReLUs of every residual
  block. protocol 'standard' (GDFQ/Qimera/IntraQ/HAST/SynQ tables): every conv and the
  dense layer at `weight_bits` with per-output-channel min/max, activations after every ReLU.

  Each layer's weight width comes from `rules` (the first rule matching its module path):
  the model, the calibration and the integer export all ask `weight_bits_of`.
  """

  weight_bits: int = 4
  act_bits: int = 4
  protocol: str = "dfqf"
  first_last_weight_bits: int = 8

  def __post_init__(self):
    if self.protocol == "standard":  # every layer at weight_bits: say so in the metadata
      object.__setattr__(self, "first_last_weight_bits", self.weight_bits)

  @property
  def rules(self) -> tuple[QuantizationRule, ...]:
    if self.weight_bits == FULL_PRECISION_BITS:
      return (QuantizationRule(".*", FULL_PRECISION_BITS),)
    return (QuantizationRule("conv1|linear", self.first_last_weight_bits),  # stem and head
            QuantizationRule(".*", self.weight_bits))

  def weight_bits_of(self, module_path) -> int:
    """The weight width of the layer at `module_path` (a '/'-joined string or a tuple)."""
    if not isinstance(module_path, str):
      module_path = "/".join(module_path)
    return next(rule.weight_bits for rule in self.rules
                if re.fullmatch(rule.module_path, module_path))

  @property
  def quantize_stem_activation(self) -> bool:
    return self.protocol == "standard"


def calibrate_clip(method: str, values, bits: int, signed: bool) -> float:
  """Clip of one tensor (NumPy in, float out) by the rule `method`, one of CALIBRATIONS:
  a weight (signed) or one calibration batch of a ReLU's input (unsigned). The rules are
  METHOD.md's, written out in `dfqf_jax.clip_rules`."""
  if method not in clip_rules.CLIP_RULES:
    raise ValueError(f"calibration={method!r} is unknown; use one of {list(CALIBRATIONS)}.")
  return clip_rules.clip(method, clip_rules.summarize(values, signed, [method]), bits)
