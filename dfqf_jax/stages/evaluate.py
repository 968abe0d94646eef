"""Evaluation: top-1 on the test split of every classifier checkpoint found in DIR.

Every stage's checkpoint meta names the classifiers it holds (`classifiers`: name ->
description + path inside the state); this stage rebuilds each one and writes
DIR/results.json, one entry per model, merged with what is already there.
"""
import json
import os

from dfqf_jax import checkpoints, data, parallel, training
from dfqf_jax.stages import common

RESULTS_FILE = "results.json"


def checkpoint_dirs(workdir: str) -> list[str]:
  """Every stage folder of DIR that holds at least one checkpoint."""
  dirs = (os.path.join(workdir, entry) for entry in sorted(os.listdir(workdir)))
  return [d for d in dirs if checkpoints.exists(d)]


def evaluate_dir(directory, splits, mesh, data_dir, known: dict) -> dict:
  """Evaluates the classifiers of the latest checkpoint in `directory`; entries of `known`
  (the existing results.json) for the same checkpoint are reused, not recomputed."""
  step = checkpoints.latest_step(directory)
  checkpoint = os.path.join(directory, str(step))
  written = os.path.getmtime(checkpoint)
  cached = {n: r for n, r in known.items()
            if r.get("checkpoint") == checkpoint and r.get("checkpoint_mtime") == written}
  if cached:  # the wall time may have grown since (a resumed stage)
    return {n: {**r, "stage_wall_seconds": training.read_wall_time(directory)}
            for n, r in cached.items()}
  state, meta, step = checkpoints.load_product(directory, os.path.basename(directory))
  results = {}
  for name, entry in common.classifiers_in(meta).items():
    if entry["dataset"] not in splits:
      splits[entry["dataset"]] = data.load_split(entry["dataset"], "test", data_dir)
    model = common.classifier_from_meta(entry)
    variables = common.variables_of(state, entry.get("path", ()))
    top1 = common.top1(model, variables, splits[entry["dataset"]], entry["mean"], entry["std"],
                       mesh)
    described = {k: v for k, v in entry.items() if k not in ("path", "mean", "std", "arch")}
    results[name] = {"top1": top1, "num_params": common.num_params(variables["params"]),
                     "checkpoint": checkpoint, "checkpoint_mtime": written, "step": step,
                     "stage_wall_seconds": training.read_wall_time(directory),
                     **described}
  return results


def run(config, workdir: str) -> dict:
  if not os.path.isdir(workdir):
    raise checkpoints.CheckpointError(f"--workdir={workdir!r} does not exist; point it at the "
                                      "folder your stages wrote.")
  mesh = parallel.make_mesh()
  path = os.path.join(workdir, RESULTS_FILE)
  merged = {}
  if os.path.exists(path):
    with open(path) as f:
      merged = json.load(f)
  splits = {}
  results = {}
  for directory in checkpoint_dirs(workdir):
    results.update(evaluate_dir(directory, splits, mesh, config.data.dir, merged))
  if not results:
    raise checkpoints.CheckpointError(f"no checkpoint found in {workdir!r}; run a stage first.")
  merged.update(results)
  if training.is_main_process():
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(merged, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  print(format_table(results))
  return merged


def format_table(results: dict) -> str:
  lines = [f"{'model':<28} {'top-1':>8} {'params':>9} {'step':>7}"]
  for name, r in sorted(results.items()):
    lines.append(f"{name:<28} {100 * r['top1']:>7.2f}% {r['num_params']:>9,} {r['step']:>7}")
  return "\n".join(lines)
