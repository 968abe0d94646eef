"""The DAFL generator used by DFQF.

z (latent_dim) -> Dense(128 * (s/4)^2) -> (N, 128, s/4, s/4) channel-major, to NHWC -> BN
-> nearest x2 -> Conv3x3(128) -> BN -> LeakyReLU(0.2) -> nearest x2 -> Conv3x3(64) -> BN
-> LeakyReLU(0.2) -> Conv3x3(channels) -> tanh -> BN(no scale, no bias).

`reference_quirks=True` (faithful mode, the default) reproduces the reference code: the two
middle BNs use epsilon 0.8 (a positional-argument slip inherited from DAFL), conv weights
are initialized N(0, 0.02) and BN scales N(1, 0.02). With False: epsilon 1e-5 and PyTorch's
default initializers everywhere.
The dense layer always keeps PyTorch's default initializer, as in the reference code.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dfqf_jax.models.layers import BatchNorm, normal_init, torch_default_uniform


def _upsample_nearest(x, factor: int = 2):
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Generator(nn.Module):
  latent_dim: int = 1000
  image_size: int = 32
  channels: int = 3
  reference_quirks: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool = True):
    quirks = self.reference_quirks
    conv_init = normal_init(0.0, 0.02) if quirks else torch_default_uniform()
    bn_scale_init = normal_init(1.0, 0.02) if quirks else nn.initializers.ones
    middle_eps = 0.8 if quirks else 1e-5
    side = self.image_size // 4

    def conv(features, in_features, name):
      bias_init = lambda key, shape, dtype: torch_default_uniform()(
          key, shape, dtype, fan_in=9 * in_features)
      return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                     bias_init=bias_init, dtype=self.dtype, name=name)

    def bn(name, eps=1e-5, affine=True):
      return BatchNorm(use_running_average=not train, epsilon=eps, use_scale=affine,
                       use_bias=affine, scale_init=bn_scale_init, name=name)

    x = nn.Dense(128 * side * side, kernel_init=torch_default_uniform((0,)),
                 bias_init=lambda key, shape, dtype: torch_default_uniform()(
                     key, shape, dtype, fan_in=self.latent_dim),
                 dtype=self.dtype, name="linear")(z.astype(self.dtype))
    x = x.reshape(-1, 128, side, side).transpose(0, 2, 3, 1)
    x = bn("bn0")(x)
    x = conv(128, 128, "conv1")(_upsample_nearest(x))
    x = nn.leaky_relu(bn("bn1", middle_eps)(x), 0.2)
    x = conv(64, 128, "conv2")(_upsample_nearest(x))
    x = nn.leaky_relu(bn("bn2", middle_eps)(x), 0.2)
    x = jnp.tanh(conv(self.channels, 64, "conv3")(x))
    return bn("bn_out", affine=False)(x).astype(jnp.float32)


def sample_latent(key, batch_size: int, latent_dim: int):
  """z ~ N(0, I). Under jit the values do not depend on how the batch is sharded."""
  return jax.random.normal(key, (batch_size, latent_dim), jnp.float32)
