"""Architectures, the PyTorch weight import and the published teacher accuracy."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PUBLISHED_TOP1
from dfqf_jax import classifiers, convert, data, parallel
from dfqf_jax.models.generator import Generator, UpsampleConv, from_meta
from dfqf_jax.models.resnet import CifarResNet


@pytest.mark.parametrize("depth, expected", [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_resnet_parameter_counts(depth, expected):
  variables = jax.eval_shape(lambda: CifarResNet(depth).init(jax.random.key(0),
                                                             jnp.zeros((1, 32, 32, 3))))
  assert classifiers.num_params(variables["params"]) == expected


def test_option_a_shortcut_pads_channels_on_both_sides():
  from dfqf_jax.models.resnet import option_a_shortcut
  x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16) + 1
  y = option_a_shortcut(x, 32, 2)
  assert y.shape == (2, 2, 2, 32)
  assert float(jnp.abs(y[..., :8]).sum()) == 0 and float(jnp.abs(y[..., 24:]).sum()) == 0
  np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])


def test_generator_shapes_and_reference_quirks():
  g = Generator(latent_dim=1000, reference_quirks=True)
  variables = g.init(jax.random.key(0), jnp.zeros((2, 1000)))
  x, _ = g.apply(variables, jax.random.normal(jax.random.key(1), (64, 1000)),
                 mutable=["batch_stats"])
  assert x.shape == (64, 32, 32, 3)
  # Final non-affine BN in training mode: per-channel standardized output.
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)
  assert "scale" not in variables["params"].get("bn_out", {})
  scales = np.asarray(variables["params"]["bn1"]["scale"])
  assert 0.9 < scales.mean() < 1.1 and 0.005 < scales.std() < 0.04  # N(1, 0.02)
  kernel = np.asarray(variables["params"]["conv2"]["kernel"])
  assert 0.015 < kernel.std() < 0.025  # N(0, 0.02)


def test_generator_width_is_its_channels_and_old_checkpoints_are_the_reference_width():
  def conv_kernels(generator):
    shapes = jax.eval_shape(lambda: generator.init(jax.random.key(0), jnp.zeros((2, 8))))
    return [shapes["params"][f"conv{i}"]["kernel"].shape for i in (1, 2, 3)]

  assert conv_kernels(from_meta({"latent_dim": 8, "reference_quirks": True, "width": 16})) == [
      (3, 3, 16, 16), (3, 3, 16, 8), (3, 3, 8, 3)]
  # Metadata written before the width was recorded: the reference's 128.
  assert conv_kernels(from_meta({"latent_dim": 8, "reference_quirks": True})) == [
      (3, 3, 128, 128), (3, 3, 128, 64), (3, 3, 64, 3)]


class _Layer(nn.Module):
  """The generator's layer as the reference code writes it (upsample, then convolve) or
  fused (UpsampleConv), under the same name."""
  fused: bool

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(1.0)
    if self.fused:
      return UpsampleConv(4, init, init, name="conv")(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, bias_init=init,
                   name="conv")(x)


def test_upsample_conv_is_upsampling_then_a_3x3_convolution():
  reference, fused = _Layer(fused=False), _Layer(fused=True)
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 6))  # odd sides: every border case
  variables = reference.init(jax.random.key(1), x)
  # Same parameter names, shapes and initial values: checkpoints are unchanged.
  jax.tree.map(np.testing.assert_array_equal, variables, fused.init(jax.random.key(1), x))
  y = fused.apply(variables, x)
  assert y.shape == (2, 10, 6, 4)
  np.testing.assert_allclose(y, reference.apply(variables, x), rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(2), y.shape)
  loss = lambda module: lambda v, x: jnp.vdot(module.apply(v, x), cotangent)
  grads = jax.grad(loss(fused), argnums=(0, 1))(variables, x)
  expected = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
               grads, expected)


def test_weight_import_rejects_another_depth(shared_data):
  state_dict = convert.load_state_dict_npz(os.path.join(shared_data,
                                                        "resnet20-12fca82f_weights.npz"))
  with pytest.raises(convert.ConversionError, match="ResNet-32"):
    convert.torch_resnet_to_flax(state_dict, 32, 10)
  with pytest.raises(convert.ConversionError, match="ResNet-20"):
    convert.torch_resnet_to_flax({**state_dict, "layer1.3.conv1.weight": np.zeros(1)}, 20, 10)


def test_imported_teacher_scores_published_accuracy(shared_data, fully_optimized):
  state_dict = convert.load_state_dict_npz(os.path.join(shared_data,
                                                        "resnet20-12fca82f_weights.npz"))
  variables = convert.torch_resnet_to_flax(state_dict, 20, 10)
  test = data.load_split("cifar10", "test", shared_data)
  top1 = classifiers.top1_percent(CifarResNet(20), variables, test, data.IMAGENET_MEAN,
                                  data.IMAGENET_STD, parallel.make_mesh())
  assert top1 == pytest.approx(PUBLISHED_TOP1, abs=1e-9)


def test_imported_resnet56_classifies_like_its_published_accuracy(shared_data):
  """ResNet-56 (published 93.39%, SOURCES.md) on every 20th test image, all classes (the
  file is stored class by class): a wrong conversion scores near chance. Its exact accuracy
  on the whole split: experiments/budget_resnet56/resnet56_import_cpu.json."""
  state_dict = convert.load_state_dict_npz(os.path.join(shared_data,
                                                        "resnet56-4bfd9763_weights.npz"))
  variables = convert.torch_resnet_to_flax(state_dict, 56, 10)
  test = data.load_split("cifar10", "test", shared_data)
  every_20th = data.Split(test.images[::20], test.labels[::20])
  assert set(every_20th.labels.tolist()) == set(range(10))
  top1 = classifiers.top1_percent(CifarResNet(56), variables, every_20th, data.IMAGENET_MEAN,
                                  data.IMAGENET_STD, parallel.make_mesh())
  assert top1 > 89  # 500 images: 93.39% +- 1.1 points (one standard error)
