"""GDFQ's conditional generator for 32x32 images (Xu et al., ECCV 2020; main.py `Generator`).

A label y is embedded (nn.Embedding(classes, latent_dim), N(0, 1) init) and multiplied
element-wise into the latent z; the product goes through the DAFL generator that DFQF uses
(`models.generator.Generator`, the same layers as GDFQ's).
"""
import flax.linen as nn
import jax.numpy as jnp

from dfqf_jax.models.generator import REFERENCE_WIDTH, Generator


class ConditionalGenerator(nn.Module):
  num_classes: int = 10
  latent_dim: int = 100
  reference_quirks: bool = True
  dtype: jnp.dtype = jnp.float32
  width: int = REFERENCE_WIDTH

  @nn.compact
  def __call__(self, z, labels, train: bool = True):
    embedding = nn.Embed(self.num_classes, self.latent_dim,
                         embedding_init=nn.initializers.normal(1.0), name="label_embedding")
    return Generator(self.latent_dim, reference_quirks=self.reference_quirks, dtype=self.dtype,
                     width=self.width, name="generator")(embedding(labels) * z, train=train)
