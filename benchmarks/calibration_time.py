"""Wall time of calibrating the whole PTQ table (every bit width x protocol x method).

  python benchmarks/calibration_time.py [--batches 10] [--batch-size 128]
      [--bits w8a8,w6a6,w4a4] [--protocols dfqf,standard] [--methods max,mse,aciq,kl,ft]
      [--weights ../shared/data/resnet20-12fca82f_weights.npz] [--data-dir ../shared/data]
      [--tag TEXT] [--out experiments/benchmarks/calibration_time.jsonl]

Calibration batches are real training images (the same shapes as generated ones), so no
generator is needed. Times what the PTQ stage does to calibrate (from one reading of every
tensor for the whole table; in older checkouts, a calibration per table entry), compilation
of the recording forward pass included; appends one JSON line.
`--repo DIR` times the dfqf_jax package of another checkout (e.g. a worktree of an older
commit) with this same script.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--bits", default="w8a8,w6a6,w4a4")
  p.add_argument("--protocols", default="dfqf,standard")
  p.add_argument("--methods", default="max,mse,aciq,kl,ft")
  p.add_argument("--weights", default=os.path.join(HERE, "..", "shared", "data",
                                                   "resnet20-12fca82f_weights.npz"))
  p.add_argument("--data-dir", default=os.path.join(HERE, "..", "shared", "data"))
  p.add_argument("--repo", default=HERE, help="checkout whose dfqf_jax is timed")
  p.add_argument("--tag", default="")
  p.add_argument("--out",
                 default=os.path.join(HERE, "experiments", "benchmarks", "calibration_time.jsonl"))
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, os.path.abspath(args.repo))
  import jax
  import numpy as np

  from dfqf_jax import calibration, convert, data
  from dfqf_jax import quant as q
  from dfqf_jax.provenance import cpu_model, git_state, utc_date

  teacher = convert.torch_resnet_to_flax(convert.load_state_dict_npz(args.weights), 20, 10)
  train = data.load_split("cifar10", "train", args.data_dir)
  idx = np.random.default_rng(0).permutation(len(train.images))
  batches = [data.normalize(train.images[idx[i * args.batch_size:(i + 1) * args.batch_size]],
                            data.IMAGENET_MEAN, data.IMAGENET_STD) for i in range(args.batches)]
  methods = args.methods.split(",")
  tables = [(w, a, protocol) for w, a in (map(int, b[1:].split("a")) for b in args.bits.split(","))
            for protocol in args.protocols.split(",")]

  def calibrate_table():
    """The PTQ stage's calibration: one reading of the tensors for the whole table."""
    summaries = calibration.summarize(teacher, 20, 10, batches, methods)
    for w, a, protocol in tables:
      for method in methods:
        spec = q.QuantSpec(w, a, protocol)
        _, variables = calibration.quantized_student(teacher, 20, 10, spec)
        jax.block_until_ready(calibration.calibrate(variables, spec, method, summaries))

  def calibrate_table_per_method():
    """Older checkouts (before shared summaries): calibrate(model, variables, batches, spec,
    method) read the tensors again for every bit width, protocol and method."""
    for method in methods:
      for w, a, protocol in tables:
        spec = q.QuantSpec(w, a, protocol)
        model, variables = calibration.quantized_student(teacher, 20, 10, spec)
        jax.block_until_ready(calibration.calibrate(model, variables, batches, spec, method))

  shared = hasattr(calibration, "summarize")
  run = calibrate_table if shared else calibrate_table_per_method
  started = time.perf_counter()
  run()
  seconds = time.perf_counter() - started
  commit, dirty = git_state()
  row = {"what": "calibration of the PTQ table", "batches": args.batches,
         "batch_size": args.batch_size, "bits": args.bits, "protocols": args.protocols,
         "methods": args.methods, "seconds_total": round(seconds, 3),
         "shared_summaries": shared,
         "timed_repo": os.path.abspath(args.repo), "commit": commit, "dirty": dirty,
         "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
         "num_devices": jax.device_count(), "tag": args.tag,
         "date": utc_date()}
  print(json.dumps(row))
  with open(args.out, "a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
