"""Verification against the fake-quantized model, layer by layer (the analysis tools' view).

Equality with the fake-quantized model: in exact arithmetic every pre-rounding value t above
equals the fake-quant model's (ReLU input / step) and the logits are equal. The integer
layers compute the exact value's codes; the fake-quant model computes t in float32 (a
float32 conv of dequantized values, then BN), ~1e-7 relative off, so where t lies within
that of a half-integer one of its codes differs by one, and the difference propagates to
later layers. The float-input layers (below the requantization) round on both sides.
`layer_by_layer` measures the ties alone (each integer layer fed the fake-quant model's own
input); tests/test_integer.py and dfqf_jax/tools/integer_check.py report both, and
dfqf_jax/tools/rescale_ties.py compares with the fake-quant model run in float64.
"""
import jax
import jax.numpy as jnp

from dfqf_jax.integer.forward import apply_layer


def fake_quant_tensors(model, variables: dict, graph: dict, arrays: dict, x) -> dict:
  """The fake-quantized model's tensors on `x` in the integer graph's terms (name -> (kind,
  value, step, bits)): codes = round(value / step) of each quantized ReLU output (exact:
  the values are codes * step), the float stem output, and the logits."""
  logits, state = model.apply(variables, x, capture_intermediates=True)
  inter = state["intermediates"]
  env = {"input": ("float", jnp.asarray(x, jnp.float32), None, None),
         "logits": ("float", logits, None, None)}
  for layer in graph["layers"][:-1]:
    name = layer["name"]
    if "." in name:  # layerS_B.convK -> the block's actK
      block, conv = name.split(".")
      value = inter[block][conv.replace("conv", "act")]["__call__"][0]
    elif layer["act_bits"]:  # the standard protocol's quantized stem ReLU
      value = inter["act1"]["__call__"][0]
    else:  # the dfqf stem: relu(bn1(...)), relu not a module
      value = jax.nn.relu(inter["bn1"]["__call__"][0])
    if layer["act_bits"]:
      step = jnp.asarray(arrays[f"{name}.act_step"], jnp.float32)
      env[layer["output"]] = ("codes", jnp.round(value / step).astype(jnp.int32), step,
                              layer["act_bits"])
    else:
      env[layer["output"]] = ("float", value, None, None)
  return env


def layer_by_layer(model, variables: dict, graph: dict, arrays: dict, x) -> dict:
  """Each integer layer run on the fake-quantized model's own input tensors, compared with
  its output: name -> {'mismatched': codes that differ, 'total', 'max_code_diff'}; for the
  dense layer `max_logit_diff_units`, the largest |logit difference| / output step. This
  isolates float32 rounding ties from their propagation through later layers."""
  return compare_layers(graph, arrays, fake_quant_tensors(model, variables, graph, arrays, x))


def compare_layers(graph: dict, arrays: dict, env: dict) -> dict:
  """`layer_by_layer` on given tensors `env` (as `fake_quant_tensors` returns them)."""
  last = env[graph["layers"][-1]["input"]][1]
  unit = output_unit(graph, arrays, last.shape[1] * last.shape[2])
  result = {}
  for layer in graph["layers"]:
    kind, value, _, _ = apply_layer(layer, arrays, graph["protocol"], env)
    _, reference, _, _ = env[layer["output"]]
    if kind == "codes":
      diff = jnp.abs(value - reference)
      result[layer["name"]] = {"mismatched": (diff > 0).sum(), "total": diff.size,
                               "max_code_diff": diff.max()}
    elif layer["op"] == "mean_dense":
      result[layer["name"]] = {"max_logit_diff_units": (jnp.abs(value - reference) / unit).max()}
    else:
      result[layer["name"]] = {"max_abs_diff": jnp.abs(value - reference).max()}
  return result


def output_unit(graph: dict, arrays: dict, positions: int = 64):
  """The logits' quantization step per class, step_last * s / (H * W) (H * W = 8 x 8 for
  CIFAR): one unit of the dense layer's int32 accumulator."""
  dense = graph["layers"][-1]
  producer = next(layer for layer in graph["layers"] if layer["output"] == dense["input"])
  step = jnp.asarray(arrays[f"{producer['name']}.act_step"], jnp.float32)
  unit = step * jnp.asarray(arrays[f"{dense['name']}.scale"], jnp.float32) / positions
  return jnp.broadcast_to(unit, (graph["num_classes"],))
