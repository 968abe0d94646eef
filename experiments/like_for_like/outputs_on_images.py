"""How confident the teacher and a ZeroQ workdir's students are on its distilled images and on
real test images, and which classes they predict: what the W3A3 students' KD target is.

    .venv/bin/python experiments/like_for_like/outputs_on_images.py \
        runs/like_for_like_budget/zeroq_seed2 \
        --out experiments/like_for_like/outputs_on_images/zeroq_seed2.json

Per model and image set: the mean and median of the largest softmax probability, the mean
entropy of the softmax (ln 10 = 2.303 for a uniform one), how many images each class wins
(argmax), and a student's agreement with the teacher's argmax. The test images are a fixed
random subset of the test split (the same for every model; nothing is selected on them).
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import dfqf_jax  # noqa: E402
from dfqf_jax import checkpoints, data, losses, provenance, report, storage  # noqa: E402
from dfqf_jax.errors import UserError  # noqa: E402
from dfqf_jax.stages import zeroq  # noqa: E402


def output_statistics(logits, teacher_argmax=None) -> tuple[dict, np.ndarray]:
  """(the statistics of one model's logits [N, classes] on one image set, its argmax [N]);
  with the teacher's argmax on the same images, the agreement with it too."""
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
  largest = np.asarray(probs.max(-1))
  entropy = np.asarray(losses.entropy(probs))
  argmax = np.asarray(probs.argmax(-1))
  stats = {"max_softmax_mean": round(float(largest.mean()), 4),
           "max_softmax_median": round(float(np.median(largest)), 4),
           "entropy_mean": round(float(entropy.mean()), 4),
           "argmax_counts": np.bincount(argmax, minlength=probs.shape[-1]).tolist()}
  if teacher_argmax is not None:
    stats["agreement_with_teacher"] = round(float(np.mean(argmax == teacher_argmax)), 4)
  return stats, argmax


def checkpoint_of(model) -> dict:
  """Which checkpoint was measured: its step and the fingerprint of its state."""
  origin = model.meta[checkpoints.ORIGIN]
  return {"step": origin["step"], "fingerprint": origin["fingerprint"]}


def measure(workdir: str, data_dir: str, test_images: int) -> dict:
  """The record: per model (the teacher and each student of `workdir`) and image set, the
  checkpoint measured and its output statistics."""
  distilled, _ = zeroq.load_images(workdir)  # in the teacher's normalized input space
  teacher = dfqf_jax.load(workdir, "teacher")
  mean, std = (np.asarray(teacher.meta[k], np.float32) for k in ("mean", "std"))
  test = data.load_split(teacher.meta["dataset"], "test", data_dir)
  subset = np.random.default_rng(0).permutation(len(test))[:test_images]
  # float images on the [0, 1] scale the models normalize again (unclipped: as distilled)
  image_sets = {"distilled": distilled * std + mean, "test": test.images[subset]}
  models = {"teacher": {"checkpoint": checkpoint_of(teacher)}}
  teacher_argmax = {}
  for set_name, images in image_sets.items():
    models["teacher"][set_name], teacher_argmax[set_name] = output_statistics(teacher(images))
  for name in dfqf_jax.list_models(workdir):
    if name.startswith("student_"):
      student = dfqf_jax.load(workdir, name)
      models[name] = {"checkpoint": checkpoint_of(student),
                      **{s: output_statistics(student(images), teacher_argmax[s])[0]
                         for s, images in image_sets.items()}}
  return {"command": provenance.command_line(), "commit": provenance.commit(),
          "hardware": report.hardware(), "date": provenance.utc_date(),
          "workdir": workdir, "distilled_images": len(distilled),
          "test_images": len(subset), "models": models}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdir", help="a pipeline workdir run with --config.images=zeroq")
  parser.add_argument("--data_dir", default="../shared/data")
  parser.add_argument("--test_images", type=int, default=1000)
  parser.add_argument("--out", required=True, help="the JSON record to write")
  args = parser.parse_args(argv)
  try:
    record = measure(args.workdir, args.data_dir, args.test_images)
  except UserError as e:  # no ZeroQ stage, teacher or test split there: one line, no record
    print(f"error: {e}", file=sys.stderr)
    return 2
  storage.write_atomically(args.out, json.dumps(record, indent=1) + "\n")
  for name, sets in record["models"].items():
    for set_name in ("distilled", "test"):
      print(f"{name} on {set_name}: {json.dumps(sets[set_name])}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
