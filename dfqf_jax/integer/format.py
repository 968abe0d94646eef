"""The export folder's file format: what `save` writes and `load` reads back, checked.

`model.json`  the graph: input normalization, protocol and bit widths (and the command line's
              per-layer rules `layer_rules`, when the model had any), and the layers in
              execution order (name, op, input/output tensor, stride, bit widths, residual
              input), plus the dtype/shape/packing of every array in weights.npz.
`weights.npz` per conv/dense layer `L`: `L.codes` integer weight codes (int8 for signed
              codes, uint8 for per-channel weights' unsigned ones; 4 bits and fewer packed
              two per byte, low nibble first, row-major, two's complement for signed codes),
              `L.scale` (float32: one per tensor, or one per output channel), `L.zero_point`
              (per-channel weights, int32 per output channel), `L.bn_scale` / `L.bn_bias`
              (batch norm folded: bn(z) = z * bn_scale + bn_bias per channel, computed in
              float64 from the running statistics, stored float64), `L.bias` (dense), and
              for a layer whose ReLU output is quantized `L.act_clip` / `L.act_step`
              (step = clip / (2^b - 1), float32, as the fake quantizer computes it); and
              the rescaling constants the forward pass uses, `L.multiplier`, `L.offset`,
              `L.shortcut_multiplier` (float64, see `requant_params`; `load` checks that
              they follow from the arrays above and derives the integer requantization
              tables from them, `requant_tables`).
`model.stablehlo` the integer forward below as a `jax.export` artifact (uint8 NHWC images
              in, float32 logits out, any batch size), runnable with JAX alone.
"""
import json
import os

import numpy as np

from dfqf_jax import checkpoints, clip_rules, storage
from dfqf_jax.integer.graph import act_step
from dfqf_jax.integer.requant import is_table, requant_params, requant_tables

FORMAT = "dfqf-jax integer model"
VERSION = 2  # 2: float64 folded BN and rescale constants, exact requantization
GRAPH_FILE = "model.json"
WEIGHTS_FILE = "weights.npz"
STABLEHLO_FILE = "model.stablehlo"
EXPORT_DIR = "export"  # a workdir's exports: DIR/export/<model name>/
# The graph fields that say which model an export holds (an export of another one is never
# overwritten by the export stage).
IDENTITY = ("protocol", "weight_bits", "act_bits", "edge_weight_bits", "layer_rules", "depth",
            "num_classes")  # (layer_rules: only in the graph of a model that had any)
PACK_BITS = 4  # codes of this many bits or fewer are stored two per byte


def signed_codes(arrays, name: str) -> bool:
  """Whether layer `name`'s weight codes are signed: per-tensor weights (no zero points);
  per-channel ones (with zero points) are unsigned. `arrays`: the arrays, or their names."""
  return f"{name}.zero_point" not in arrays


def pack(codes: np.ndarray, bits: int, signed: bool) -> np.ndarray:
  """Codes of <= 4 bits, two per byte (low nibble first, row-major); else int8/uint8."""
  flat = np.asarray(codes, np.int64).ravel()
  if bits > PACK_BITS:
    return flat.reshape(codes.shape).astype(np.int8 if signed else np.uint8)
  nibbles = (flat & 0xF).astype(np.uint8)
  if nibbles.size % 2:
    nibbles = np.append(nibbles, np.uint8(0))
  return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack(stored: np.ndarray, bits: int, signed: bool, shape) -> np.ndarray:
  size = int(np.prod(shape))
  if bits > PACK_BITS:
    return np.asarray(stored, np.int32).reshape(shape)
  stored = np.asarray(stored, np.uint8)
  nibbles = np.stack([stored & 0xF, stored >> 4], -1).ravel()[:size].astype(np.int32)
  if signed:
    nibbles = np.where(nibbles >= 8, nibbles - 16, nibbles)
  return nibbles.reshape(shape)


def stored_arrays(graph: dict, arrays: dict) -> dict:
  """The arrays as weights.npz stores them: codes int8 / uint8, 4 bits and fewer packed; the
  requantization tables left out (derived)."""
  return {k: pack(v, _layer(graph, k.rsplit(".", 1)[0])["weight_bits"],
                  signed_codes(arrays, k.rsplit(".", 1)[0]))
          if k.endswith(".codes") else np.asarray(v) for k, v in arrays.items()
          if not is_table(k)}


def export_bytes(folder: str) -> int:
  """The size of an export's weights and graph, the files a deployment needs."""
  return sum(storage.getsize(os.path.join(folder, name)) for name in (WEIGHTS_FILE, GRAPH_FILE))


def save(folder: str, graph: dict, arrays: dict) -> dict:
  """Writes model.json and weights.npz into `folder` (which must exist); returns the graph
  as written (with the array descriptions)."""
  stored = stored_arrays(graph, arrays)
  described = {}
  for key, value in sorted(stored.items()):
    described[key] = {"dtype": str(value.dtype), "shape": list(value.shape)}
    if key.endswith(".codes"):
      bits = _layer(graph, key.rsplit(".", 1)[0])["weight_bits"]
      described[key].update(bits=bits, packed=bits <= PACK_BITS)
  graph = {"format": FORMAT, "version": VERSION, **graph, "arrays": described}
  with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
    np.savez(f, **stored)
  with open(os.path.join(folder, GRAPH_FILE), "w") as f:
    json.dump(graph, f, indent=1)
  return graph


def _layer(graph: dict, name: str) -> dict:
  return next(layer for layer in graph["layers"] if layer["name"] == name)


def load(folder: str) -> tuple[dict, dict]:
  """(graph, arrays with unpacked int32 codes) of an exported folder, checked: every array
  present with its declared dtype and shape, codes packed and ranged for the declared bits."""
  path = os.path.join(folder, GRAPH_FILE)
  try:
    graph = json.loads(storage.read_text(path))
    with storage.open_file(os.path.join(folder, WEIGHTS_FILE), "rb") as f, np.load(f) as npz:
      stored = {k: npz[k] for k in npz.files}
  except (OSError, ValueError) as e:
    raise checkpoints.CheckpointError(
        f"the export {folder!r} cannot be read ({type(e).__name__}: {e}); it is incomplete: "
        "rerun the export stage.") from e
  if graph.get("format") != FORMAT or graph.get("version") != VERSION:
    raise checkpoints.CheckpointError(
        f"{path!r} is not a {FORMAT} of version {VERSION} (it says {graph.get('format')!r}, "
        f"version {graph.get('version')!r}); export the student again (configs/export.py).")
  arrays = {}
  for key, desc in graph["arrays"].items():
    if key not in stored:
      raise checkpoints.CheckpointError(f"the export {folder!r} lacks the array {key!r}; "
                                        "rerun the export stage.")
    value = stored[key]
    if key.endswith(".codes"):
      layer = _layer(graph, key.rsplit(".", 1)[0])
      bits, signed = layer["weight_bits"], signed_codes(graph["arrays"], layer["name"])
      expected = pack(np.zeros(layer["shape"], np.int32), bits, signed)
      lo, hi = clip_rules.integer_range(bits, signed)
      codes = None
      if value.dtype == expected.dtype and value.shape == expected.shape:
        codes = unpack(value, bits, signed, layer["shape"])
      if codes is None or codes.min() < lo or codes.max() > hi:
        raise checkpoints.CheckpointError(
            f"the export {folder!r} declares {bits}-bit weights for {layer['name']} "
            f"(W{graph['weight_bits']}A{graph['act_bits']}, {graph['protocol']}) but its "
            f"codes are {value.dtype}{list(value.shape)}"
            + ("" if codes is None else f" in [{codes.min()}, {codes.max()}]")
            + f", not {expected.dtype}{list(expected.shape)} in [{lo}, {hi}]: the weights "
            "come from another bit width; rerun the export stage.")
      value = codes
    elif str(value.dtype) != desc["dtype"] or list(value.shape) != desc["shape"]:
      raise checkpoints.CheckpointError(
          f"the export {folder!r} has {key} as {value.dtype}{list(value.shape)}, but "
          f"{GRAPH_FILE} says {desc['dtype']}{desc['shape']}; rerun the export stage.")
    arrays[key] = value
  for layer in graph["layers"]:
    if layer.get("act_bits"):
      step = act_step(arrays[f"{layer['name']}.act_clip"], layer["act_bits"])
      if step != arrays[f"{layer['name']}.act_step"]:
        raise checkpoints.CheckpointError(
            f"the export {folder!r} has an activation step for {layer['name']} that is not "
            f"clip / (2^{layer['act_bits']} - 1): the activations come from another bit "
            "width; rerun the export stage.")
  for key, value in requant_params(graph, arrays).items():
    if not np.array_equal(value, arrays.get(key)):
      raise checkpoints.CheckpointError(
          f"the export {folder!r} has {key} that does not follow from its scales, batch norm "
          f"and steps; the arrays come from different models or another bit width: rerun "
          "the export stage.")
  return graph, {**arrays, **requant_tables(graph, arrays)}
