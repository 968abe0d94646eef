"""Layers with PyTorch semantics shared by the ResNets and the generator."""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_INPUT_STATS = "bn_input_stats"


def torch_default_uniform(fan_in_axes: tuple[int, ...] = (0, 1, 2)) -> Callable:
  """PyTorch's default Conv/Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  (kaiming_uniform with a=sqrt(5) gives exactly this bound for weights; biases use
  the same bound.)
  """

  def init(key, shape, dtype=jnp.float32, fan_in=None):
    if fan_in is None:
      fan_in = 1
      for axis in fan_in_axes:
        fan_in *= shape[axis]
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal_init(mean: float, stddev: float) -> Callable:
  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)

  return init


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics over NHWC (or NC) inputs.

  * running = momentum * running + (1 - momentum) * batch, momentum = 0.9 (PyTorch 0.1);
  * training mode normalizes with the biased batch variance but updates the running
    variance with the unbiased one;
  * when the `bn_input_stats` collection is mutable, it records the batch mean and the
    unbiased batch variance of its input (DFQF's BN-statistics loss), in either mode.

  Statistics are over the whole (global) batch: under `jit` with a batch-sharded input,
  XLA reduces across devices, so results do not depend on the device count.
  """

  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    reduce_axes = tuple(range(x.ndim - 1))
    count = x.size // features
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    record = self.is_mutable_collection(BN_INPUT_STATS)

    x32 = x.astype(jnp.float32)
    if record or not use_running_average:
      batch_mean = x32.mean(reduce_axes)
      batch_var = jnp.square(x32 - batch_mean).mean(reduce_axes)
      unbiased_var = batch_var * (count / max(count - 1, 1))
    if record:
      self.sow(BN_INPUT_STATS, "mean", batch_mean)
      self.sow(BN_INPUT_STATS, "var", unbiased_var)

    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      mean, var = batch_mean, batch_var
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * batch_mean
        running_var.value = m * running_var.value + (1 - m) * unbiased_var

    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", self.scale_init, (features,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return y.astype(x.dtype)
