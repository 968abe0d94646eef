"""Where an exported integer model and its fake-quantized checkpoint disagree, which side is
off: the fake-quant model run in float64 against its float32 self and against the integer
model's logits, then the layer with the most layer-local code mismatches and, for its
channels without a residual input, the accumulator value at the rounding boundary evaluated
in float64 and in the integer path's float32.

  python scripts/rescale_ties.py --workdir DIR --name student_w4a4 \
      --integer-logits DIR/integer_logits/student_w4a4.npy [--out RECORD.json]

The integer logits come from scripts/integer_check.py --logits-dir (all test images).
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dfqf_jax import data, integer, report, storage  # noqa: E402
from dfqf_jax.stages import common, export  # noqa: E402

BATCH = 500


def fake_quant_logits(entry, variables, split, dtype) -> np.ndarray:
  with jax.enable_x64(dtype == jnp.float64):  # only here: the rest runs as the export does
    return _fake_quant_logits(entry, variables, split, dtype)


def _fake_quant_logits(entry, variables, split, dtype) -> np.ndarray:
  model = common.classifier_from_meta(entry, dtype=dtype)
  variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
  apply = jax.jit(lambda v, x: model.apply(v, x.astype(dtype)))
  return np.concatenate([
      np.asarray(apply(variables, data.normalize(split.images[i:i + BATCH], entry["mean"],
                                                 entry["std"])))
      for i in range(0, len(split), BATCH)])


def exact_requant_constants(graph, arrays, layer, channel):
  """M and B of `layer`'s rescale for one channel in float64 (integer.requant_params rounds
  the same values to float32)."""
  steps = {l["output"]: np.float64(arrays[f"{l['name']}.act_step"])
           for l in graph["layers"] if l["op"] == "conv" and l["act_bits"]}
  name = layer["name"]
  scale = np.asarray(arrays[f"{name}.scale"], np.float64)
  scale = scale[channel] if scale.ndim else scale
  multiplier = (steps[layer["input"]] * scale
                * np.float64(arrays[f"{name}.bn_scale"][channel]) / steps[layer["output"]])
  return multiplier, np.float64(arrays[f"{name}.bn_bias"][channel]) / steps[layer["output"]]


def worst_layer(model, variables, graph, arrays, split, images: int) -> dict:
  x = data.normalize(split.images[:images], graph["mean"], graph["std"])
  env = integer.fake_quant_tensors(model, variables, graph, arrays, x)
  counts = {}
  for layer in graph["layers"][:-1]:
    kind, value, _, _ = integer.apply_layer(layer, arrays, graph["protocol"], env)
    if kind == "codes":
      counts[layer["name"]] = (np.asarray(value), np.asarray(env[layer["output"]][1]))
  name = max(counts, key=lambda n: (counts[n][0] != counts[n][1]).sum())
  layer = next(l for l in graph["layers"] if l["name"] == name)
  exact, fake = counts[name]
  per_channel = (exact != fake).sum((0, 1, 2))
  result = {"images": images, "layer": name,
            "mismatches_per_layer": {n: int((a != b).sum()) for n, (a, b) in counts.items()},
            "channels": {}}
  requant = integer.requant_params(graph, arrays)
  for channel in np.nonzero(per_channel)[0]:
    entry = {"mismatches": int(per_channel[channel])}
    if not layer.get("shortcut"):  # y = acc * M + B: the boundary's accumulator value
      m64, b64 = exact_requant_constants(graph, arrays, layer, channel)
      where = exact[..., channel] != fake[..., channel]
      boundary = (exact[..., channel][where][0] + fake[..., channel][where][0]) / 2
      acc = int(np.round((boundary - b64) / m64))
      m32 = requant[f"{name}.multiplier"][channel]
      b32 = requant[f"{name}.offset"][channel]
      entry.update({"multiplier": float(m32), "offset": float(b32), "accumulator": acc,
                    "boundary": float(boundary), "value_float64": float(acc * m64 + b64),
                    "value_float32": float(np.float32(acc) * m32 + b32),
                    "integer_code": int(exact[..., channel][where][0]),
                    "fake_quant_code": int(fake[..., channel][where][0])})
    result["channels"][int(channel)] = entry
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--name", default="student_w4a4")
  parser.add_argument("--integer-logits", required=True)
  parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data"))
  parser.add_argument("--layer-images", type=int, default=2000,
                      help="test images for the layer-local search")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  _, variables, entry, _, _ = export.load_student(args.workdir, args.name)
  graph, arrays = integer.load(os.path.join(args.workdir, export.EXPORT_DIR, args.name))
  split = data.load_split("cifar10", "test", args.data_dir)
  integer_logits = np.load(args.integer_logits)
  f32 = fake_quant_logits(entry, variables, split, jnp.float32)
  f64 = fake_quant_logits(entry, variables, split, jnp.float64)
  classes = {k: v.argmax(-1) for k, v in
             {"float32": f32, "float64": f64, "integer": integer_logits}.items()}
  agreement = {f"{a}_vs_{b}": float(np.mean(classes[a] == classes[b]))
               for a, b in [("float32", "float64"), ("float32", "integer"),
                            ("float64", "integer")]}
  top1 = {k: float(np.mean(v == split.labels)) for k, v in classes.items()}
  print(f"class agreement: {agreement}; top-1: {top1}")
  model = common.classifier_from_meta(entry)
  worst = worst_layer(model, variables, graph, arrays, split, args.layer_images)
  print(f"layer-local mismatches on {args.layer_images} images: "
        f"{worst['mismatches_per_layer']}\nmost in {worst['layer']}: {worst['channels']}")
  if args.out:
    record = {"command": " ".join(["python"] + sys.argv), "commit": report.git_commit(),
              "hardware": report.hardware(), "model": args.name, "class_agreement": agreement,
              "top1": top1, "layer_local": worst}
    storage.write_atomically(args.out, json.dumps(record, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
