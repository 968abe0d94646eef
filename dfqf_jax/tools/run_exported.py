"""Runs exported integer models (`model.stablehlo`, written by configs/export.py) on the
CIFAR test split with JAX and NumPy alone, as a user without dfqf_jax would.

  python dfqf_jax/tools/run_exported.py DIR/export/student_w4a4/model.stablehlo [MORE ...] \
      --data-dir ../shared/data [--expected-dir LOGITS_DIR] [--logits-dir OUT_DIR] \
      [--out RECORD.json]

Each artifact takes uint8 NHWC images and returns logits; it is named after its folder
(export/<name>/model.stablehlo). Prints each one's top-1 over the split. --expected-dir
compares the logits with <name>.npy there, those dfqf_jax's integer forward pass computed for
the same images (python -m dfqf_jax.tools.integer_check --logits-dir): agreement of the
predicted classes and the largest logit difference. --logits-dir saves this process's logits
as <name>.npy; --out writes a JSON record. It never imports dfqf_jax (checked before anything
is written), so it is run as a file (`python -m` would import the package first); copied next
to an artifact it needs only JAX and NumPy.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

BATCH = 500


def commit() -> str:
  """The checkout's commit (+dirty), or '' outside a git checkout."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True).stdout.strip()
  head = git("rev-parse", "HEAD")
  return head + ("+dirty" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def artifact_name(path: str) -> str:
  return os.path.basename(os.path.dirname(os.path.abspath(path)))


def run_artifact(path: str, images: np.ndarray) -> np.ndarray:
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return np.concatenate([np.asarray(exported.call(images[i:i + BATCH]))
                         for i in range(0, len(images), BATCH)])


def compare(logits: np.ndarray, expected: np.ndarray) -> dict:
  return {"class_agreement": float(np.mean(logits.argmax(-1) == expected.argmax(-1))),
          "max_abs_logit_diff": float(np.abs(logits - expected).max()),
          "logit_range": float(expected.max() - expected.min())}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
  parser.add_argument("--data-dir", required=True)
  parser.add_argument("--dataset", default="cifar10")
  parser.add_argument("--expected-dir", default="", help="<name>.npy logits to compare with")
  parser.add_argument("--logits-dir", default="", help="write each artifact's logits here")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  names = [artifact_name(p) for p in args.artifacts]
  expected_paths = {n: os.path.join(args.expected_dir, f"{n}.npy") for n in names
                    if args.expected_dir}
  missing = [p for p in [*args.artifacts, *expected_paths.values()] if not os.path.exists(p)]
  if missing:
    parser.error(f"{', '.join(missing)} not found; give export/<name>/model.stablehlo files "
                 "and an --expected-dir holding <name>.npy for each.")
  with np.load(os.path.join(args.data_dir, f"{args.dataset}_test.npz")) as f:
    images, labels = f["images"], f["labels"]
  started, results, logits = time.time(), {}, {}
  for name, path in zip(names, args.artifacts):
    logits[name] = run_artifact(path, images)
    results[name] = {"artifact": path, "artifact_bytes": os.path.getsize(path),
                     "top1_percent": 100 * float(np.mean(logits[name].argmax(-1) == labels))}
    print(f"{path}: top-1 {results[name]['top1_percent']:.2f}% on {len(labels):,} "
          f"{args.dataset} test images, {results[name]['artifact_bytes']:,} bytes")
    if name in expected_paths:
      expected = np.load(expected_paths[name])
      if expected.shape != logits[name].shape:
        print(f"error: {expected_paths[name]} holds logits of shape {expected.shape}, the "
              f"artifact gave {logits[name].shape}; pass the logits of the same model on the "
              "same split.", file=sys.stderr)
        return 1
      results[name]["comparison"] = {"expected": expected_paths[name],
                                     **compare(logits[name], expected)}
      c = results[name]["comparison"]
      print(f"  against {expected_paths[name]}: classes agree on "
            f"{100 * c['class_agreement']:.2f}% of the images, largest logit difference "
            f"{c['max_abs_logit_diff']:.3g} (logits span {c['logit_range']:.3g})")
  imported = sorted(m for m in sys.modules if m.startswith("dfqf_jax"))
  if imported:
    print(f"error: this process imported {imported}", file=sys.stderr)
    return 1
  print(f"JAX {jax.__version__} alone; dfqf_jax never imported")
  if args.logits_dir:
    os.makedirs(args.logits_dir, exist_ok=True)
    for name, values in logits.items():
      np.save(os.path.join(args.logits_dir, f"{name}.npy"), values)
  if args.out:
    record = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "test_images": len(labels), "imports_dfqf_jax": False, "results": results,
              "seconds": round(time.time() - started, 1), "jax": jax.__version__,
              "commit": commit(),
              "hardware": f"{jax.device_count()} x {jax.devices()[0].device_kind}; "
                          f"host: {platform.processor() or platform.machine()}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(args.out + ".tmp", "w") as f:
      json.dump(record, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
