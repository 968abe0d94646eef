"""Where an exported integer model and its fake-quantized checkpoint disagree, which side is
off: the fake-quant model run in float64 against its float32 self and against the integer
model's logits; then, layer by layer, each integer layer fed the fake-quant model's own
input tensors (float32 and float64 runs) and its output codes compared with that model's.
The integer layers requantize exactly (dfqf_jax.integer.requant_tables), so against the
float64 model only the layers reading a float tensor may differ; against the float32 model
every layer differs where float32 rounds a near-tie the other way.

  python -m dfqf_jax.tools.rescale_ties --workdir DIR --name student_w4a4 \
      --integer-logits DIR/integer_logits/student_w4a4.npy [--out RECORD.json]

The integer logits come from `python -m dfqf_jax.tools.integer_check --logits-dir` (all test
images).
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dfqf_jax import classifiers, data, integer, provenance, report, storage
from dfqf_jax.stages import export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
BATCH = 500


def fake_quant_model(entry, variables, dtype):
  """The fake-quant model and its variables in `dtype` (float64: under jax.enable_x64)."""
  return (classifiers.classifier_from_meta(entry, dtype=dtype),
          jax.tree.map(lambda a: jnp.asarray(a, dtype), variables))


def fake_quant_logits(entry, variables, split, dtype) -> np.ndarray:
  with jax.enable_x64(dtype == jnp.float64):  # only here: the rest runs as the export does
    model, variables = fake_quant_model(entry, variables, dtype)
    apply = jax.jit(lambda v, x: model.apply(v, x.astype(dtype)))
    return np.concatenate([
        np.asarray(apply(variables, data.normalize(split.images[i:i + BATCH], entry["mean"],
                                                   entry["std"])))
        for i in range(0, len(split), BATCH)])


def fake_quant_tensors(entry, variables, graph, arrays, x, dtype) -> dict:
  """integer.fake_quant_tensors of the fake-quant model run in `dtype`, handed back as the
  integer forward pass takes them (int32 codes, float32 values)."""
  with jax.enable_x64(dtype == jnp.float64):
    model, variables = fake_quant_model(entry, variables, dtype)
    env = integer.fake_quant_tensors(model, variables, graph, arrays, jnp.asarray(x, dtype))
    env = {name: (kind, np.asarray(value), step, bits)
           for name, (kind, value, step, bits) in env.items()}
  return {name: (kind, jnp.asarray(value, jnp.int32 if kind == "codes" else jnp.float32),
                 step, bits) for name, (kind, value, step, bits) in env.items()}


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
  graph, arrays = integer.load(os.path.join(args.workdir, integer.EXPORT_DIR, args.name))
  split = data.load_split("cifar10", "test", args.data_dir)
  integer_logits = np.load(args.integer_logits)
  f32 = fake_quant_logits(entry, variables, split, jnp.float32)
  f64 = fake_quant_logits(entry, variables, split, jnp.float64)
  classes = {k: v.argmax(-1) for k, v in
             {"float32": f32, "float64": f64, "integer": integer_logits}.items()}
  agreement = {f"{a}_vs_{b}": float(np.mean(classes[a] == classes[b]))
               for a, b in [("float32", "float64"), ("float32", "integer"),
                            ("float64", "integer")]}
  top1 = {k: 100 * float(np.mean(v == split.labels)) for k, v in classes.items()}
  print(f"class agreement: {agreement}; top-1 (%): {top1}")
  x = data.normalize(split.images[:args.layer_images], graph["mean"], graph["std"])
  exact = integer.exact_layers(graph)
  layer_local = {}
  for dtype in (jnp.float32, jnp.float64):
    counts, compared = {}, 0
    for i in range(0, len(x), BATCH):
      env = fake_quant_tensors(entry, variables, graph, arrays, x[i:i + BATCH], dtype)
      for name, result in integer.compare_layers(graph, arrays, env).items():
        if "mismatched" in result:
          counts[name] = counts.get(name, 0) + int(result["mismatched"])
          compared += result["total"]
    dtype_name = jnp.dtype(dtype).name
    layer_local[dtype_name] = {
        "exact_layers": sum(n for name, n in counts.items() if name in exact),
        "float_input_layers": sum(n for name, n in counts.items() if name not in exact),
        "codes_compared": compared, "per_layer": counts}
    print(f"layer-local code mismatches against the {dtype_name} fake-quant model on "
          f"{args.layer_images} images: integer-requantized layers "
          f"{layer_local[dtype_name]['exact_layers']}, float-input layers "
          f"{layer_local[dtype_name]['float_input_layers']}")
  if args.out:
    record = {"command": " ".join(["python"] + sys.argv), "commit": provenance.commit(),
              "hardware": report.hardware(), "model": args.name, "class_agreement": agreement,
              "top1_percent": top1, "layer_local_images": args.layer_images,
              "layer_local": layer_local}
    storage.write_atomically(args.out, json.dumps(record, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
