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

DEPTHS = (20, 32, 44, 56, 110)
QUANT_INPUTS = "quant_inputs"
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def blocks_per_stage(depth: int) -> int:
  if depth not in DEPTHS:
    raise ValueError(f"model.depth={depth} is not a CIFAR ResNet depth; use one of {DEPTHS}.")
  return (depth - 2) // 6


def _quantize_weight(module: nn.Module, w):
  """Fake-quantizes a kernel (output channels last) as module.quant says for its path."""
  spec = module.quant
  bits = spec.weight_bits_of(module.path) if spec else q.FULL_PRECISION_BITS
  if bits == q.FULL_PRECISION_BITS:
    return w
  if spec.protocol == "standard":
    return q.fake_quant_minmax_per_channel(w, bits)
  clip = module.param(q.WEIGHT_CLIP, nn.initializers.ones, (), jnp.float32)
  return q.fake_quant_signed(w, clip, bits)


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


def _option_a_shortcut(x, features: int, strides: int):
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
    relu = (lambda y, name: QuantReLU(self.quant.act_bits, name=name)(y)) if self.quant else (
        lambda y, name: nn.relu(y))
    y = QuantConv(self.features, self.strides, self.quant, name="conv1")(x)
    y = BatchNorm(use_running_average=not self.train, name="bn1")(y)
    y = relu(y, "act1")
    y = QuantConv(self.features, 1, self.quant, name="conv2")(y)
    y = BatchNorm(use_running_average=not self.train, name="bn2")(y)
    return relu(y + _option_a_shortcut(x, self.features, self.strides), "act2")


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
    if self.quant and self.quant.quantize_stem_activation:
      x = QuantReLU(self.quant.act_bits, name="act1")(x)
    else:
      x = nn.relu(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(blocks_per_stage(self.depth)):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, train, self.quant,
                       name=f"layer{stage + 1}_{block}")(x)
    x = x.mean(axis=(1, 2))
    x = QuantDense(self.num_classes, self.quant, name="linear")(x)
    return x.astype(jnp.float32)
