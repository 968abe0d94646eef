"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, option A shortcuts), NHWC.

Matches the PyTorch reference (akamaster/pytorch_resnet_cifar10) layer for layer, so that
its state dicts import exactly: 3x3 convs with explicit 1-pixel padding, no conv biases,
option-A shortcuts that subsample by 2 and zero-pad channels on both sides, Kaiming-normal
(fan_in) conv and dense weights.

With `quant` set, weights and activations are fake-quantized (see `dfqf_jax.quant`); the
parameter names of the full-precision model are kept, so teacher weights load directly
into a quantized student, which adds `weight_clip` / `act_clip` parameters.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dfqf_jax import quant as q
from dfqf_jax.models.layers import BatchNorm, torch_default_uniform

# 6n + 2 layers, n blocks per stage: the CIFAR ResNets of He et al. (2016), and ResNet-8 (one
# block per stage) for quick checks: a third of ResNet-20's layers to compile and run.
DEPTHS = (8, 20, 32, 44, 56, 110)
QUANT_INPUTS = "quant_inputs"
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def blocks_per_stage(depth: int) -> int:
  if depth not in DEPTHS:
    raise ValueError(f"model.depth={depth} is not a CIFAR ResNet depth; use one of {DEPTHS}.")
  return (depth - 2) // 6


def layer_sizes(depth: int, num_classes: int) -> list[tuple[str, int, int]]:
  """(path, kernel size, size of its ReLU output per 32x32 image; 0: no ReLU) of each layer
  the quantization rules name, in execution order: 'conv1', 'layer{S}_{B}/conv{K}', 'linear'."""
  sizes = [("conv1", 3 * 3 * 3 * 16, 32 * 32 * 16)]
  for stage, features in enumerate((16, 32, 64)):
    side = 32 >> stage
    for block in range(blocks_per_stage(depth)):
      in_features = features // 2 if stage > 0 and block == 0 else features
      name = f"layer{stage + 1}_{block}"
      sizes += [(f"{name}/conv1", 9 * in_features * features, side * side * features),
                (f"{name}/conv2", 9 * features * features, side * side * features)]
  return sizes + [("linear", 64 * num_classes, 0)]


def layer_paths(depth: int) -> list[str]:
  return [path for path, _, _ in layer_sizes(depth, 10)]


def activation_layer(act_path) -> tuple:
  """The layer whose ReLU output the activation at `act_path` is: (..., 'actK') ->
  (..., 'convK')."""
  return (*act_path[:-1], act_path[-1].replace("act", "conv"))


def _quantize_weight(module: nn.Module, w):
  """Fake-quantizes a kernel (output channels last) as module.quant's rule for its path says."""
  rule = module.quant.rule_of(module.path) if module.quant else None
  if rule is None or rule.weight_bits == q.FULL_PRECISION_BITS:
    return w
  if rule.weight_granularity == q.PER_CHANNEL:
    return q.fake_quant_minmax_per_channel(w, rule.weight_bits)
  clip = module.param(q.WEIGHT_CLIP, nn.initializers.ones, (), jnp.float32)
  return q.fake_quant_signed(w, clip, rule.weight_bits)


def _relu(quant: q.QuantSpec | None, layer: tuple, name: str):
  """The ReLU after `layer`: quantized as its rule says (QuantReLU), or plain."""
  bits = quant.rule_of(layer).act_bits if quant else None
  return (lambda y: nn.relu(y)) if bits is None else QuantReLU(bits, name=name)


class QuantConv(nn.Module):
  """3x3 convolution with 1-pixel padding and no bias; optionally fake-quantized weights."""

  features: int
  strides: int = 1
  quant: q.QuantSpec | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", kaiming_normal, (3, 3, x.shape[-1], self.features))
    kernel = _quantize_weight(self, kernel)
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.strides, self.strides), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class QuantDense(nn.Module):
  """Dense layer with bias; optionally fake-quantized weights (bias stays float)."""

  features: int
  quant: q.QuantSpec | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", kaiming_normal, (x.shape[-1], self.features))
    bias = self.param("bias", torch_default_uniform((0,)), (self.features,), jnp.float32,
                      x.shape[-1])
    kernel = _quantize_weight(self, kernel)
    return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class QuantReLU(nn.Module):
  """ReLU whose output is fake-quantized (unsigned) with a learned clip `act_clip`.

  Records its *input* in the `quant_inputs` collection when that is mutable: the calibration
  rules read the ReLU's input, as the reference code's hooks on its ReLU modules do.
  """

  bits: int

  @nn.compact
  def __call__(self, x):
    if self.is_mutable_collection(QUANT_INPUTS):
      self.sow(QUANT_INPUTS, "x", x)
    x = nn.relu(x)
    if self.bits == q.FULL_PRECISION_BITS:
      return x
    clip = self.param(q.ACT_CLIP, nn.initializers.ones, (), jnp.float32)
    return q.fake_quant_unsigned(x, clip.astype(x.dtype), self.bits)


def option_a_shortcut(x, features: int, strides: int):
  """Identity, or subsample by `strides` and zero-pad channels equally on both sides."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = x[:, ::strides, ::strides, :]
  pad = (features - x.shape[-1]) // 2
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad, features - x.shape[-1] - pad)))


class BasicBlock(nn.Module):
  features: int
  strides: int
  train: bool
  quant: q.QuantSpec | None = None

  @nn.compact
  def __call__(self, x):
    relu = lambda k: _relu(self.quant, (*self.path, f"conv{k}"), f"act{k}")
    y = QuantConv(self.features, self.strides, self.quant, name="conv1")(x)
    y = BatchNorm(use_running_average=not self.train, name="bn1")(y)
    y = relu(1)(y)
    y = QuantConv(self.features, 1, self.quant, name="conv2")(y)
    y = BatchNorm(use_running_average=not self.train, name="bn2")(y)
    return relu(2)(y + option_a_shortcut(x, self.features, self.strides))


class CifarResNet(nn.Module):
  """CIFAR ResNet; `__call__(x, train)` maps normalized NHWC images to logits."""

  depth: int = 20
  num_classes: int = 10
  quant: q.QuantSpec | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = QuantConv(16, 1, self.quant, name="conv1")(x)
    x = BatchNorm(use_running_average=not train, name="bn1")(x)
    x = _relu(self.quant, ("conv1",), "act1")(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(blocks_per_stage(self.depth)):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, train, self.quant,
                       name=f"layer{stage + 1}_{block}")(x)
    x = x.mean(axis=(1, 2))
    x = QuantDense(self.num_classes, self.quant, name="linear")(x)
    return x.astype(jnp.float32)
