"""Integer deployment check on the whole CIFAR-10 test split: the exported integer model
(dfqf_jax.integer, read back from its export folder) against the fake-quantized model.

  python -m dfqf_jax.tools.integer_check [--students w8a8,w4a4,w3a3] [--protocols dfqf,standard]
      [--workdir DIR] [--names student_w4a4,...]
      [--out experiments/integer_check/integer_check_cpu.json]

Without --names, each student is built in-process: the imported teacher
(--weights, default ../shared/data/resnet20-12fca82f_weights.npz) quantized with `ft`
clips calibrated on one batch of 128 real training images, saved as a checkpoint in DIR
(a temporary folder by default) and exported by the export stage. With --names, the
students already in --workdir are exported and checked. Per model, on all test images:
agreement of the predicted classes (must be >= 99.9%), top-1 of both (within 0.05 points),
the largest logit difference in units of the output's quantization step (end to end, and
with each layer fed the fake-quant model's own input: the layer-local code mismatches,
float32 rounding ties), the jax.export artifact's agreement on 1,000 images, and the sizes
on disk. --logits-dir keeps the integer model's test logits, which
dfqf_jax/tools/run_exported.py --expected-dir compares with the artifact's in a process without
dfqf_jax. Writes a JSON record (command, commit, hardware, wall time, results); exits 1 if a
check fails.
"""
import argparse
import json
import os
import sys
import tempfile
import time

# The checkout: configs/ beside the package, ../shared/data and experiments/ for the defaults.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dfqf_jax import parallel  # noqa: E402

parallel.use_cpu_cores()  # before JAX starts its backends

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dfqf_jax import (calibration, checkpoints, classifiers, convert, data, integer,  # noqa: E402
                      provenance, report, validation)
from dfqf_jax import quant as q  # noqa: E402
from dfqf_jax.stages import export  # noqa: E402

MIN_AGREEMENT = 0.999
MAX_TOP1_GAP_POINTS = 0.05
BATCH = 500
ARTIFACT_IMAGES = 1000


def build_students(args, workdir: str) -> list[str]:
  """Quantized students of the imported teacher, ft clips from 128 real training images,
  saved as checkpoints in `workdir`; returns their names."""
  teacher = convert.torch_resnet_to_flax(convert.load_state_dict_npz(args.weights), 20, 10)
  train = data.load_split("cifar10", "train", args.data_dir)
  idx = np.random.default_rng(args.seed).permutation(len(train))[:128]
  batch = data.normalize(train.images[idx], data.IMAGENET_MEAN, data.IMAGENET_STD)
  summaries = calibration.summarize(teacher, 20, 10, [batch], ["ft"])
  names = []
  for w, a in q.parse_bits(args.students):
    for protocol in validation.split_names(args.protocols):
      spec = q.QuantSpec(w, a, protocol)
      name = f"student_w{w}a{a}_{protocol}"
      _, variables = calibration.quantized_student(teacher, 20, 10, spec)
      variables = calibration.calibrate(variables, spec, "ft", summaries)
      meta = classifiers.classifier_meta(20, "cifar10", data.IMAGENET_MEAN, data.IMAGENET_STD,
                                         spec, model_name=name, weight_bits=w, act_bits=a,
                                         protocol=protocol, calibration="ft",
                                         calibration_data="real", calibration_images=128,
                                         total_steps=0)
      directory = os.path.join(workdir, name)
      if not checkpoints.exists(directory):
        checkpoints.save_once(directory, jax.tree.map(jnp.asarray, variables), meta)
      names.append(name)
  return names


def check(workdir: str, name: str, split: data.Split, mesh, logits_dir: str) -> dict:
  started = time.time()
  sizes = export.run(ml_collections.ConfigDict({"student": name, "bits": ""}), workdir)
  spec, variables, entry, _, _ = export.load_student(workdir, name)
  model = classifiers.classifier_from_meta(entry)
  folder = os.path.join(workdir, integer.EXPORT_DIR, name)
  graph, arrays = integer.load(folder)  # the artifact on disk, not the in-memory build
  unit = integer.output_unit(graph, arrays)
  mean, std = graph["mean"], graph["std"]

  @jax.jit
  def batch_stats(variables, arrays, images, labels, valid):
    x = data.normalize(images, mean, std)
    env = integer.fake_quant_tensors(model, variables, graph, arrays, x)
    fake = env["logits"][1]
    exact = integer.forward(graph, arrays, x)
    local, per_image = {}, 0
    for layer in graph["layers"][:-1]:
      kind, value, _, _ = integer.apply_layer(layer, arrays, env)
      if kind == "codes":
        local[layer["name"]] = (jnp.abs(value - env[layer["output"]][1]) > 0).sum((1, 2, 3))
        per_image += int(np.prod(value.shape[1:]))
    head = integer.apply_layer(graph["layers"][-1], arrays, env)[1]
    diff = jnp.abs(fake - exact) / unit
    w = valid.astype(jnp.int32)
    return {
        "agree": ((fake.argmax(-1) == exact.argmax(-1)) * w).sum(),
        "fake_correct": ((fake.argmax(-1) == labels) * w).sum(),
        "int_correct": ((exact.argmax(-1) == labels) * w).sum(),
        "max_diff_units": jnp.where(valid[:, None], diff, 0).max(),
        "sum_max_diff_units": (diff.max(-1) * valid).sum(),
        "within_one_unit": ((diff.max(-1) < 1) * w).sum(),
        "max_abs_logit_diff": jnp.where(valid[:, None], jnp.abs(fake - exact), 0).max(),
        "local_mismatch": sum(v * w for v in local.values()).sum(),
        "local_total": w.sum() * per_image,
        "head_local_units": jnp.where(valid[:, None], jnp.abs(head - fake) / unit, 0).max(),
    }, exact

  variables = parallel.replicate(mesh, variables)
  arrays_r = parallel.replicate(mesh, arrays)
  totals, int_logits = None, []
  for start in range(0, len(split), BATCH):
    idx = np.arange(start, start + BATCH)
    valid = idx < len(split)
    idx = np.minimum(idx, len(split) - 1)
    batch = parallel.global_batch(mesh, {"images": split.images[idx],
                                         "labels": split.labels[idx].astype(np.int32),
                                         "valid": valid})
    stats, exact = batch_stats(variables, arrays_r, batch["images"], batch["labels"],
                               batch["valid"])
    int_logits.append(np.asarray(exact)[valid])
    stats = jax.device_get(stats)
    totals = stats if totals is None else {
        k: (max(totals[k], v) if k.startswith(("max", "head")) else totals[k] + v)
        for k, v in stats.items()}
  n = len(split)
  evaluated = time.time() - started
  int_logits = np.concatenate(int_logits)
  if logits_dir:  # for dfqf_jax/tools/run_exported.py --expected-dir, in a process without dfqf_jax
    os.makedirs(logits_dir, exist_ok=True)
    np.save(os.path.join(logits_dir, f"{name}.npy"), int_logits)

  # The jax.export artifact, as a user without dfqf_jax would run it.
  with open(os.path.join(folder, integer.STABLEHLO_FILE), "rb") as f:
    artifact = integer.deserialize(f.read())
  images = split.images[:ARTIFACT_IMAGES]
  artifact_logits = np.concatenate([np.asarray(artifact.call(images[i:i + BATCH]))
                                    for i in range(0, len(images), BATCH)])
  expected = int_logits[:len(images)]
  result = {
      "weight_bits": spec.weight_bits, "act_bits": spec.act_bits, "protocol": spec.protocol,
      "test_images": n,
      "class_agreement": float(totals["agree"]) / n,
      "top1_fake_quant_percent": 100 * float(totals["fake_correct"]) / n,
      "top1_integer_percent": 100 * float(totals["int_correct"]) / n,
      "max_logit_diff_output_steps": float(totals["max_diff_units"]),
      "mean_of_per_image_max_logit_diff_output_steps": float(totals["sum_max_diff_units"]) / n,
      "images_with_all_logits_within_one_step": float(totals["within_one_unit"]) / n,
      "max_abs_logit_diff": float(totals["max_abs_logit_diff"]),
      "output_step": [float(u) for u in np.asarray(unit)],
      "layer_local_code_mismatches": int(totals["local_mismatch"]),
      "layer_local_codes_compared": int(totals["local_total"]),
      "head_layer_local_max_diff_output_steps": float(totals["head_local_units"]),
      "stablehlo_images": len(images),
      "stablehlo_class_agreement": float((artifact_logits.argmax(-1) ==
                                          expected.argmax(-1)).mean()),
      "stablehlo_max_logit_diff_output_steps": float(
          (np.abs(artifact_logits - expected) / np.asarray(unit)).max()),
      **sizes,
      "compression_vs_float32": sizes["float32_bytes"] / sizes["export_bytes"],
      "seconds": round(evaluated, 1),
  }
  result["top1_gap_points"] = abs(result["top1_integer_percent"] -
                                  result["top1_fake_quant_percent"])
  result["passed"] = bool(result["class_agreement"] >= MIN_AGREEMENT
                          and result["top1_gap_points"] <= MAX_TOP1_GAP_POINTS + 1e-10)
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--students", default="w8a8,w4a4,w3a3")
  parser.add_argument("--protocols", default="dfqf,standard")
  parser.add_argument("--names", default="", help="students already in --workdir")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data"))
  parser.add_argument("--weights", default=os.path.join(
      REPO, "..", "shared", "data", "resnet20-12fca82f_weights.npz"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--test-images", type=int, default=0, help="first N only (0: all)")
  parser.add_argument("--logits-dir", default="",
                      help="write each integer model's test logits here as <name>.npy")
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "integer_check",
                                                    "integer_check_cpu.json"))
  args = parser.parse_args()
  started = time.time()
  workdir = args.workdir or tempfile.mkdtemp(prefix="integer_check_")
  names = validation.split_names(args.names) if args.names else build_students(args, workdir)
  split = data.load_split("cifar10", "test", args.data_dir)
  if args.test_images:
    split = data.Split(split.images[:args.test_images], split.labels[:args.test_images])
  mesh = parallel.make_mesh()
  results = {}
  for name in names:
    results[name] = check(workdir, name, split, mesh, args.logits_dir)
    r = results[name]
    print(f"{name}: classes agree {100 * r['class_agreement']:.2f}%, top-1 fake-quant "
          f"{r['top1_fake_quant_percent']:.2f}% integer {r['top1_integer_percent']:.2f}%, largest "
          f"logit difference {r['max_logit_diff_output_steps']:.1f} output steps "
          f"({r['max_abs_logit_diff']:.4f} absolute), layer-local code mismatches "
          f"{r['layer_local_code_mismatches']}/{r['layer_local_codes_compared']}, export "
          f"{r['export_bytes']:,} B vs float32 {r['float32_bytes']:,} B, "
          f"{'PASS' if r['passed'] else 'FAIL'} ({r['seconds']} s)", flush=True)
  record = {
      "command": provenance.command_line(),
      "commit": provenance.commit(),
      "hardware": report.hardware(),
      "jax": jax.__version__,
      "wall_seconds": round(time.time() - started, 1),
      "date": provenance.utc_date(),
      "calibration": None if args.names else {
          "rule": "ft", "images": "128 real training images (one batch)", "seed": args.seed},
      "criteria": {"class_agreement_min": MIN_AGREEMENT,
                   "top1_gap_max_points": MAX_TOP1_GAP_POINTS},
      "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
  os.replace(args.out + ".tmp", args.out)
  print(f"record written to {args.out} ({record['wall_seconds']} s)")
  return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
