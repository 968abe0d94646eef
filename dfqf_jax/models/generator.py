"""The DAFL generator used by DFQF.

z (latent_dim) -> Dense(W * (s/4)^2) -> (N, W, s/4, s/4) channel-major, to NHWC -> BN
-> nearest x2 -> Conv3x3(W) -> BN -> LeakyReLU(0.2) -> nearest x2 -> Conv3x3(W/2) -> BN
-> LeakyReLU(0.2) -> Conv3x3(channels) -> tanh -> BN(no scale, no bias).
W = `width`: the reference's 128 in every schedule but smoke, which uses 16 (at 128 a
generated image costs about three ResNet-20 forward passes in FLOPs, for smoke numbers
nobody reads).

`reference_quirks=True` (faithful mode, the default) reproduces the reference code: the two
middle BNs use epsilon 0.8 (a positional-argument slip inherited from DAFL), conv weights
are initialized N(0, 0.02) and BN scales N(1, 0.02). With False: epsilon 1e-5 and PyTorch's
default initializers everywhere.
The dense layer always keeps PyTorch's default initializer, as in the reference code.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfqf_jax.models.layers import BatchNorm, normal_init, torch_default_uniform


# Which of a 3x3 kernel's rows reach each of the two input rows that an output row reads,
# after nearest x2 upsampling: [output row parity, input row tap, kernel row]. An even row 2i
# reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps: row 0 | rows 1+2); an odd
# row 2i+1 reads 2i, 2i+1, 2i+2 = input rows i, i, i+1 (rows 0+1 | row 2). Columns alike.
_PARITY_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                         [[1, 1, 0], [0, 0, 1]]], np.float32)


REFERENCE_WIDTH = 128  # the reference code's generator channels


class UpsampleConv(nn.Module):
  """Nearest x2 upsampling, then a 3x3 convolution with padding 1 (PyTorch's
  `Upsample(scale_factor=2)` + `Conv2d(.., 3, padding=1)`), computed at the input resolution.

  Each output pixel's parity (row, column) sees the upsampled image through an effective 2x2
  kernel on the input (sums of the 3x3 kernel's taps, `_PARITY_TAPS`), so one 2x2 convolution
  with the four parities' kernels side by side gives every output pixel: about half the
  FLOPs. (Memory is not saved: the four shifted inputs side by side are as large as the
  upsampled activation, 13-26% larger with the border row and column.) The same function as
  upsampling first (`tests/test_models.py`); the parameters are nn.Conv's (`kernel`
  3x3xCinxCout, `bias`), so checkpoints are unchanged.
  """
  features: int
  kernel_init: Callable
  bias_init: Callable
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, in_features = x.shape
    kernel = self.param("kernel", self.kernel_init, (3, 3, in_features, self.features),
                        jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    parity_kernels = jnp.einsum("atk,bul,klio->tuiabo", _PARITY_TAPS, _PARITY_TAPS, kernel)
    # The 2x2 convolution as one matrix product over the four shifted inputs side by side:
    # XLA:CPU's convolution gradients for this shape are several times slower than the
    # product's, and on a GPU it is one large GEMM.
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, t:t + h + 1, u:u + w + 1] for t in (0, 1)
                               for u in (0, 1)], axis=-1)
    y = patches @ parity_kernels.reshape(4 * in_features, 4 * self.features).astype(self.dtype)
    # y[:, k, l] covers input rows k-1, k and columns l-1, l: output pixel (2i+a, 2j+b) is
    # parity (a, b) of y[:, i+a, j+b].
    y = y.reshape(n, h + 1, w + 1, 2, 2, self.features)
    rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in (0, 1)], axis=3) for a in (0, 1)]
    y = jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, self.features)
    return y + bias.astype(self.dtype)


class Generator(nn.Module):
  latent_dim: int = 1000
  image_size: int = 32
  channels: int = 3
  reference_quirks: bool = True
  dtype: jnp.dtype = jnp.float32
  width: int = REFERENCE_WIDTH

  @nn.compact
  def __call__(self, z, train: bool = True):
    quirks = self.reference_quirks
    conv_init = normal_init(0.0, 0.02) if quirks else torch_default_uniform()
    bn_scale_init = normal_init(1.0, 0.02) if quirks else nn.initializers.ones
    middle_eps = 0.8 if quirks else 1e-5
    side = self.image_size // 4

    def bias_init(in_features):
      return lambda key, shape, dtype: torch_default_uniform()(
          key, shape, dtype, fan_in=9 * in_features)

    def upsample_conv(features, in_features, name):
      return UpsampleConv(features, conv_init, bias_init(in_features), self.dtype, name=name)

    def bn(name, eps=1e-5, affine=True):
      return BatchNorm(use_running_average=not train, epsilon=eps, use_scale=affine,
                       use_bias=affine, scale_init=bn_scale_init, name=name)

    width = self.width
    x = nn.Dense(width * side * side, kernel_init=torch_default_uniform((0,)),
                 bias_init=lambda key, shape, dtype: torch_default_uniform()(
                     key, shape, dtype, fan_in=self.latent_dim),
                 dtype=self.dtype, name="linear")(z.astype(self.dtype))
    x = x.reshape(-1, width, side, side).transpose(0, 2, 3, 1)
    x = bn("bn0")(x)
    x = upsample_conv(width, width, "conv1")(x)
    x = nn.leaky_relu(bn("bn1", middle_eps)(x), 0.2)
    x = upsample_conv(width // 2, width, "conv2")(x)
    x = nn.leaky_relu(bn("bn2", middle_eps)(x), 0.2)
    x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                bias_init=bias_init(width // 2), dtype=self.dtype, name="conv3")(x)
    x = jnp.tanh(x)
    return bn("bn_out", affine=False)(x).astype(jnp.float32)


def from_meta(meta) -> Generator:
  """The generator a stage-1 checkpoint's metadata describes (written before `width` was
  recorded: the reference width)."""
  return Generator(meta["latent_dim"], reference_quirks=meta["reference_quirks"],
                   width=meta.get("width", REFERENCE_WIDTH))


def sample_latent(key, batch_size: int, latent_dim: int):
  """z ~ N(0, I). Under jit the values do not depend on how the batch is sharded."""
  return jax.random.normal(key, (batch_size, latent_dim), jnp.float32)
