"""The portable artifact: the integer forward pass as a `jax.export` (StableHLO) program
with the weights as constants, the codes kept packed as stored (model.stablehlo)."""
import jax
import jax.numpy as jnp
import numpy as np

from dfqf_jax.integer.format import PACK_BITS, stored_arrays
from dfqf_jax.integer.forward import forward
from dfqf_jax.integer.requant import requant_tables


def unpack_in_graph(graph: dict, stored: dict) -> dict:
  """`unpack` written in jax.numpy, so that a serialized model keeps its codes packed."""
  signed = graph["protocol"] != "standard"
  arrays = dict(stored)
  for layer in graph["layers"]:
    key, shape = f"{layer['name']}.codes", layer["shape"]
    value = jnp.asarray(stored[key])
    if layer["weight_bits"] > PACK_BITS:
      arrays[key] = value.astype(jnp.int32)
      continue
    nibbles = jnp.stack([value & 0xF, value >> 4], -1).reshape(-1)[:int(np.prod(shape))]
    nibbles = nibbles.astype(jnp.int32)
    if signed:
      nibbles = jnp.where(nibbles >= 8, nibbles - 16, nibbles)
    arrays[key] = nibbles.reshape(shape)
  return arrays


def exported_function(graph: dict, arrays: dict, mean, std):
  """uint8 NHWC images -> logits, with the weights as constants (what gets serialized),
  the codes kept as stored (int8 / uint8, packed) and unpacked inside the program, and the
  requantization tables."""
  stored = stored_arrays(graph, arrays)
  tables = requant_tables(graph, arrays)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def run(images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std  # == dfqf_jax.data.normalize
    return forward(graph, {**unpack_in_graph(graph, stored), **tables}, x)

  return run


def serialize(graph: dict, arrays: dict, mean, std, height: int = 32, width: int = 32,
              channels: int = 3, platforms=("cpu", "cuda", "tpu")) -> bytes:
  """A `jax.export` (StableHLO) artifact of the integer model, batch size symbolic."""
  fn = jax.jit(exported_function(graph, arrays, mean, std))
  shape = jax.export.symbolic_shape(f"b, {height}, {width}, {channels}")
  exported = jax.export.export(fn, platforms=platforms)(jax.ShapeDtypeStruct(shape, jnp.uint8))
  return bytes(exported.serialize())


def deserialize(data: bytes):
  return jax.export.deserialize(bytearray(data))
