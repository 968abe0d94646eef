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
import functools
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


PER_TENSOR, PER_CHANNEL = "per_tensor", "per_channel"  # weight granularities
LEARNED, FIXED = "learned", "fixed"  # clip kinds


@dataclasses.dataclass(frozen=True)
class QuantizationRule:
  """How the layers whose path fully matches the regular expression `module_path` are
  quantized. A layer is a conv or the dense layer with its batch norm and ReLU, named by its
  module path ('/'-joined): 'conv1' (the stem), 'layerS_B/convK', 'linear'.

  weight_bits: the kernel's width (32: float).
  act_bits: the width of the layer's ReLU output, unsigned codes (every quantized activation
    is a ReLU output, so activation codes are never signed); 32: float, its input still
    recorded for calibration; None: a plain ReLU (dfqf's stem) or none (the dense layer).
  weight_granularity: PER_TENSOR (symmetric, signed codes, one clip) or PER_CHANNEL
    (asymmetric min/max per output channel: unsigned codes with a zero point, no clip).
  clip: LEARNED (fine-tuning trains the layer's clips) or FIXED (they keep their calibrated
    values).
  calibration: the clip rule of the layer's clips (one of CALIBRATIONS), or None for the
    job's (config.calibration).
  """
  module_path: str
  weight_bits: int
  act_bits: int | None
  weight_granularity: str = PER_TENSOR
  clip: str = LEARNED
  calibration: str | None = None

  def describe(self) -> str:
    """'layer3.*=w8a8' (+ ':per_channel', ':fixed', ':<calibration>' where they apply)."""
    act = "-" if self.act_bits is None else self.act_bits
    options = [self.weight_granularity] + [o for o in (self.clip, self.calibration)
                                           if o not in (LEARNED, None)]
    return f"{self.module_path}=w{self.weight_bits}a{act}:" + ":".join(options)


def protocol_rules(protocol: str, weight_bits: int, act_bits: int,
                   first_last_weight_bits: int) -> tuple[QuantizationRule, ...]:
  """The rule list of a protocol (first match wins): the one place the protocols differ.

  'dfqf' (the reference code): per-tensor symmetric weights with learned clips, the stem
  conv and the dense layer at `first_last_weight_bits` (unless the weights are float), the
  stem's ReLU output float, both ReLUs of every residual block at `act_bits`.
  'standard' (GDFQ/Qimera/IntraQ/HAST/SynQ tables): every layer at `weight_bits` with
  per-output-channel min/max weights, every ReLU output (the stem's too) at `act_bits`.
  """
  if protocol == "standard":
    return (QuantizationRule(".*", weight_bits, act_bits, PER_CHANNEL),)
  edge_bits = (FULL_PRECISION_BITS if weight_bits == FULL_PRECISION_BITS
               else first_last_weight_bits)
  return (QuantizationRule("conv1|linear", edge_bits, None),  # stem and head
          QuantizationRule(".*", weight_bits, act_bits))


def parse_layer_rules(text: str, base: QuantizationRule) -> tuple[QuantizationRule, ...]:
  """Per-layer rules from the command line, 'PATTERN=w<W>a<A>[:OPTION...],...' (e.g.
  'layer3.*=w8a8,conv1=w8a8:fixed'): the layers whose path fully matches PATTERN get W-bit
  weights and A-bit ReLU outputs, with `base`'s granularity; OPTION: 'fixed' (clips not
  trained) or a calibration rule (one of CALIBRATIONS). Raises ValueError naming the item."""
  rules = []
  for item in (t.strip() for t in str(text).split(",")):
    if not item:
      continue
    pattern, _, value = item.partition("=")
    bits, *options = value.strip().split(":")
    try:
      re.compile(pattern.strip())
      (w, a), = parse_bits(bits)
    except (re.error, ValueError):
      raise ValueError(f"the rule {item!r} is not of the form PATTERN=w<W>a<A>[:fixed]"
                       "[:<calibration>] with PATTERN a regular expression over layer paths "
                       "(e.g. 'layer3.*=w8a8').") from None
    unknown = [o for o in options if o != FIXED and o not in CALIBRATIONS]
    bad_bits = [b for b in (w, a) if b not in VALID_BITS]
    if unknown or bad_bits or not pattern.strip():
      raise ValueError(f"the rule {item!r} has {'bit widths' if bad_bits else 'options'} "
                       f"{bad_bits or unknown or [pattern]} it cannot use; bits are in "
                       f"{list(VALID_BITS)}, options 'fixed' or one of {list(CALIBRATIONS)}.")
    rules.append(dataclasses.replace(
        base, module_path=pattern.strip(), weight_bits=w, act_bits=a,
        clip=FIXED if FIXED in options else base.clip,
        calibration=next((o for o in options if o in CALIBRATIONS), base.calibration)))
  return tuple(rules)


def rules_slug(layer_rules: str) -> str:
  """A folder-name form of command-line rules: 'layer3.*=w8a8,conv1=w8a8' ->
  'layer3-w8a8+conv1-w8a8' (letters, digits and '_' kept, '=' -> '-', ',' -> '+')."""
  items = [t.strip() for t in str(layer_rules).split(",") if t.strip()]
  return "+".join(re.sub(r"[^A-Za-z0-9_-]", "", item.replace("=", "-").replace(":", "-"))
                  for item in items)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Which tensors of a ResNet are fake-quantized, and how: the rule list `rules`, built
  from the protocol and bit widths (`protocol_rules`) after the command line's per-layer
  rules `layer_rules` (`parse_layer_rules`). The model, the calibration, fine-tuning's
  optimizer, the integer export and the report read each layer's decision from
  `rule_of(path)` and nothing else. Checkpoints store the fields (`meta`).
  """

  weight_bits: int = 4
  act_bits: int = 4
  protocol: str = "dfqf"
  first_last_weight_bits: int = 8
  layer_rules: str = ""

  def __post_init__(self):
    if self.protocol == "standard":  # every layer at weight_bits: say so in the metadata
      object.__setattr__(self, "first_last_weight_bits", self.weight_bits)

  @functools.cached_property
  def rules(self) -> tuple[QuantizationRule, ...]:
    defaults = protocol_rules(self.protocol, self.weight_bits, self.act_bits,
                              self.first_last_weight_bits)
    return parse_layer_rules(self.layer_rules, defaults[-1]) + defaults

  def rule_of(self, module_path) -> QuantizationRule:
    """The first rule matching the layer at `module_path` (a '/'-joined string or a tuple)."""
    if not isinstance(module_path, str):
      module_path = "/".join(module_path)
    return next(rule for rule in self.rules if re.fullmatch(rule.module_path, module_path))

  def weight_bits_of(self, module_path) -> int:
    return self.rule_of(module_path).weight_bits

  def unmatched(self, layer_paths) -> list[str]:
    """The command-line rules' patterns that match none of `layer_paths`."""
    return [rule.module_path for rule in parse_layer_rules(self.layer_rules, self.rules[-1])
            if not any(re.fullmatch(rule.module_path, path) for path in layer_paths)]

  def meta(self) -> dict:
    """The fields as a checkpoint stores them (`layer_rules` only when set)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "layer_rules" or self.layer_rules}

  @classmethod
  def from_meta(cls, meta: dict) -> "QuantSpec | None":
    """The spec a checkpoint's metadata (or its results.json entry) stores as `quant`
    (`meta()`); None for a full-precision model."""
    return cls(**meta["quant"]) if meta.get("quant") else None

  @classmethod
  def of_export(cls, fields: dict) -> "QuantSpec":
    """The spec of an integer export, from its graph's fields (integer.graph.build) or its
    results.json entry."""
    return cls(fields["weight_bits"], fields["act_bits"], fields["protocol"],
               fields["edge_weight_bits"], fields.get("layer_rules", ""))

  def name_suffix(self) -> str:
    """What a model's folder name adds for this spec beyond its bits: '_<protocol>' unless
    dfqf (the reference's), '_<rules>' with command-line rules."""
    suffix = "" if self.protocol == "dfqf" else f"_{self.protocol}"
    return suffix + (f"_{rules_slug(self.layer_rules)}" if self.layer_rules else "")

  def bits_name(self) -> str:
    return bits_name(self.weight_bits, self.act_bits)

  def average_bits(self, layers) -> tuple[float, float]:
    """(weight bits, activation bits) averaged over `layers` = (path, weights, activations)
    of a model, each width weighted by the tensor's size; float tensors (32 bits, a plain
    ReLU's output) count as 32."""
    weights = activations = total_w = total_a = 0
    for path, num_weights, num_activations in layers:
      rule = self.rule_of(path)
      act_bits = FULL_PRECISION_BITS if rule.act_bits is None else rule.act_bits
      weights, total_w = weights + rule.weight_bits * num_weights, total_w + num_weights
      activations += act_bits * num_activations
      total_a += num_activations
    return weights / total_w, activations / total_a


def ptq_name(spec: QuantSpec, calibration: str, calibration_data: str = "generated") -> str:
  """A PTQ model's folder (and results.json) name:
  ptq_w{W}a{A}_{calibration}_{protocol}[_{rules}][_real]."""
  name = f"ptq_{spec.bits_name()}_{calibration}_{spec.protocol}"
  if spec.layer_rules:
    name += f"_{rules_slug(spec.layer_rules)}"
  return name + ("_real" if calibration_data == "real" else "")


def calibrate_clip(method: str, values, bits: int, signed: bool) -> float:
  """Clip of one tensor (NumPy in, float out) by the rule `method`, one of CALIBRATIONS:
  a weight (signed) or one calibration batch of a ReLU's input (unsigned). The rules are
  METHOD.md's, written out in `dfqf_jax.clip_rules`."""
  if method not in clip_rules.CLIP_RULES:
    raise ValueError(f"calibration={method!r} is unknown; use one of {list(CALIBRATIONS)}.")
  return clip_rules.clip(method, clip_rules.summarize(values, signed, [method]), bits)
