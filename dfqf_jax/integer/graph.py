"""Building the integer graph of a fake-quantized CifarResNet: weight codes, folded batch
norm, activation steps, and the rescaling constants between layers.

Quantization of the weights is done exactly as `dfqf_jax.quant` does it (float32, round half
to even): protocol 'dfqf' codes n = clip(round(w / s), -2^(b-1), 2^(b-1) - 1) with
s = clip_w / (2^(b-1) - 1), real weight n * s; protocol 'standard' per output channel
s = max(max - min, 1e-8) / (2^b - 1), z = round(-min / s), n = clip(round(w / s) + z, 0,
2^b - 1), real weight (n - z) * s. Activation codes are unsigned, real value a * step.
"""
import jax.numpy as jnp
import numpy as np

from dfqf_jax import checkpoints
from dfqf_jax import quant as q
from dfqf_jax.integer.requant import requant_params, requant_tables
from dfqf_jax.models.resnet import blocks_per_stage

BN_EPSILON = 1e-5  # dfqf_jax.models.layers.BatchNorm
POOL_POSITIONS = 64  # 8 x 8 positions averaged before the dense layer (32 x 32 inputs)


def weight_codes(kernel, clip, bits: int, protocol: str) -> dict:
  """Integer codes of a kernel (output channels last) exactly as `dfqf_jax.quant` rounds it:
  {'codes', 'scale'} (+ 'zero_point' for the standard protocol), NumPy."""
  w = jnp.asarray(kernel, jnp.float32)
  if protocol == "standard":
    axes = tuple(range(w.ndim - 1))
    w_min = jnp.minimum(w.min(axes), 0.0)
    w_max = jnp.maximum(w.max(axes), 0.0)
    q_max = 2**bits - 1
    scale = jnp.maximum(w_max - w_min, 1e-8) / q_max
    zero_point = jnp.round(-w_min / scale)
    codes = jnp.clip(jnp.round(w / scale) + zero_point, 0, q_max)
    return {"codes": np.asarray(codes, np.int32), "scale": np.asarray(scale, np.float32),
            "zero_point": np.asarray(zero_point, np.int32)}
  q_min, q_max = q.signed_range(bits)
  step = jnp.asarray(clip, jnp.float32) / q_max
  codes = jnp.clip(jnp.round(w / step), q_min, q_max)
  return {"codes": np.asarray(codes, np.int32), "scale": np.asarray(step, np.float32)}


def act_step(clip, bits: int) -> np.float32:
  """The activation step as the fake quantizer computes it (float32 clip / q_max)."""
  return np.float32(np.float32(clip) / np.float32(q.unsigned_range(bits)[1]))


def fold_bn(bn: dict, stats: dict) -> dict:
  """bn(z) = (z - mean) / sqrt(var + eps) * scale + bias = z * bn_scale + bn_bias."""
  g = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64)
                                                     + BN_EPSILON)
  b = np.asarray(bn["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * g
  return {"bn_scale": g, "bn_bias": b}


def check_exportable(spec: q.QuantSpec | None, what: str) -> None:
  if spec is None:
    raise checkpoints.CheckpointError(
        f"{what} is not a quantized model (its checkpoint has no quantization spec); export "
        "a student or PTQ model (e.g. --config.student=student_w4a4).")
  if q.FULL_PRECISION_BITS in (spec.weight_bits, spec.act_bits):
    raise checkpoints.CheckpointError(
        f"{what} has W{spec.weight_bits}A{spec.act_bits}: 32-bit (float) weights or "
        "activations have no integer codes; only models with 2..8-bit weights and "
        "activations export.")


def build(variables: dict, spec: q.QuantSpec, depth: int, num_classes: int) -> tuple:
  """(graph, arrays) of a fake-quantized CifarResNet's variables; arrays are unpacked."""
  check_exportable(spec, "this model")
  params, stats = variables["params"], variables["batch_stats"]
  graph = {"protocol": spec.protocol, "weight_bits": spec.weight_bits,
           "act_bits": spec.act_bits, "edge_weight_bits": spec.weight_bits_of("conv1"),
           "depth": depth, "num_classes": num_classes, "layers": []}
  arrays = {}

  def conv(block, k, stride, input_, output, shortcut=None):
    """The k-th conv of `block` (None: the stem) with its BN and, if quantized, its ReLU."""
    p, s = (params[block], stats[block]) if block else (params, stats)
    name = f"{block}.conv{k}" if block else f"conv{k}"
    kernel, act = p[f"conv{k}"]["kernel"], p.get(f"act{k}")  # no act: a float ReLU output
    bits = spec.weight_bits_of(name.replace(".", "/"))
    codes = weight_codes(kernel, p[f"conv{k}"].get(q.WEIGHT_CLIP), bits, spec.protocol)
    arrays.update({f"{name}.{key}": v for key, v in codes.items()})
    arrays.update({f"{name}.{key}": v for key, v in fold_bn(p[f"bn{k}"], s[f"bn{k}"]).items()})
    layer = {"name": name, "op": "conv", "input": input_, "output": output, "stride": stride,
             "weight_bits": bits, "shape": list(np.shape(kernel)),
             "act_bits": None, "shortcut": shortcut}
    if act is not None:
      layer["act_bits"] = spec.act_bits
      arrays[f"{name}.act_clip"] = np.float32(act[q.ACT_CLIP])
      arrays[f"{name}.act_step"] = act_step(act[q.ACT_CLIP], spec.act_bits)
    graph["layers"].append(layer)

  conv(None, 1, 1, "input", "stem")
  x, channels = "stem", 16
  for stage, features in enumerate((16, 32, 64)):
    for block in range(blocks_per_stage(depth)):
      stride = 2 if stage > 0 and block == 0 else 1
      b = f"layer{stage + 1}_{block}"
      conv(b, 1, stride, x, f"{b}.act1")
      conv(b, 2, 1, f"{b}.act1", f"{b}.act2",
           shortcut={"input": x, "stride": stride, "in_channels": channels})
      x, channels = f"{b}.act2", features
  head_bits = spec.weight_bits_of("linear")
  codes = weight_codes(params["linear"]["kernel"], params["linear"].get(q.WEIGHT_CLIP),
                       head_bits, spec.protocol)
  arrays.update({f"linear.{k}": v for k, v in codes.items()})
  arrays["linear.bias"] = np.asarray(params["linear"]["bias"], np.float32)
  graph["layers"].append({"name": "linear", "op": "mean_dense", "input": x, "output": "logits",
                          "weight_bits": head_bits,
                          "shape": list(np.shape(params["linear"]["kernel"])),
                          "pool_positions": POOL_POSITIONS})
  arrays.update(requant_params(graph, arrays))
  return graph, {**arrays, **requant_tables(graph, arrays)}


def num_params(graph: dict) -> int:
  """Weights and biases of the float model the export came from (conv kernels, BN scale and
  bias, dense kernel and bias); clips not counted."""
  total = 0
  for layer in graph["layers"]:
    total += int(np.prod(layer["shape"]))
    total += layer["shape"][-1] * (2 if layer["op"] == "conv" else 1)
  return total
