"""Evaluation: top-1 on the test split of every classifier checkpoint found in DIR, and of
every integer export in DIR/export.

Every stage's checkpoint meta names the classifiers it holds (`classifiers`: name ->
description + path inside the state); this stage rebuilds each one and writes
DIR/results.json, one entry per model, merged with what is already there.
"""
import json
import os
import sys

from tqdm import tqdm

from dfqf_jax import (checkpoints, classifiers, data, integer, parallel, signals, storage,
                      top1, training)
from dfqf_jax.scoring import (EXPORT_PREFIX, RESULTS_FILE, checkpoint_dirs, classifier_top1,
                              export_dirs, integer_top1, stale_reasons)

class TestSplits(dict):
  """dataset -> (test split, its fingerprint), each loaded once, when first needed."""

  def __init__(self, data_dir):
    super().__init__()
    self.data_dir = data_dir

  def __missing__(self, dataset):
    split = data.load_split(dataset, "test", self.data_dir)
    self[dataset] = (split, data.fingerprint(split))
    return self[dataset]


def evaluate_dir(directory, splits: TestSplits, mesh, known: dict) -> dict:
  """Evaluates the classifiers of the latest checkpoint in `directory` (a folder of the
  workdir). An entry of `known` (the existing results.json) is reused only if it was computed
  from this very checkpoint, untouched since (its path in the workdir, and the names, sizes
  and times of its files: a truncated or rewritten file is read and scored again, or
  refused), on this very test data (fingerprint of images and labels)."""
  step = checkpoints.latest_step(directory)
  checkpoint = f"{os.path.basename(directory)}/{step}"  # relative to the workdir
  files = storage.folder_signature(os.path.join(directory, str(step)))
  cached = {n: r for n, r in known.items()
            if r.get("checkpoint") == checkpoint and r.get("checkpoint_files") == files
            and r.get("test_data") == splits[r["dataset"]][1] and checkpoints.ORIGIN in r}
  if cached:  # the wall time may have grown since (a resumed stage)
    return {n: {**r, "stage_wall_seconds": training.read_wall_time(directory)}
            for n, r in cached.items()}
  state, meta, step = checkpoints.load_product(directory, os.path.basename(directory))
  results = {}
  for name, entry in classifiers.classifiers_in(meta).items():
    split, split_fingerprint = splits[entry["dataset"]]
    variables = classifiers.variables_of(state, entry.get("path", ()))
    top1_percent = classifier_top1(entry, variables, split, mesh)
    described = {k: v for k, v in entry.items()
                 if k not in ("path", "mean", "std", "arch", checkpoints.ORIGIN)}
    results[name] = {top1.FIELD: top1_percent,
                     "num_params": classifiers.num_params(variables["params"]),
                     "checkpoint": checkpoint, "checkpoint_files": files, "step": step,
                     "stage_wall_seconds": training.read_wall_time(directory),
                     "test_data": split_fingerprint, **described,
                     "lineage": meta.get("lineage", {}),
                     checkpoints.ORIGIN: meta[checkpoints.ORIGIN],  # as lineages name it
                     "finished": meta[checkpoints.ORIGIN]["finished"]}
  return results


def evaluate_exports(workdir: str, splits, mesh, known: dict) -> dict:
  """`export_<name>` -> result entry for every DIR/export/<name>/: top-1 on the test split
  of the integer model read back from the folder (dfqf_jax.integer). `splits`: dataset ->
  (test split, its fingerprint), as TestSplits gives. An entry of `known` is reused
  if it was computed from this very folder, untouched since (the names, sizes and times of
  its files), on the same test data."""
  results = {}
  for name, folder in export_dirs(workdir).items():
    signals.raise_if_stopped()
    key = EXPORT_PREFIX + name
    checkpoint = f"{integer.EXPORT_DIR}/{name}"  # relative to the workdir
    files = storage.folder_signature(folder)
    cached = known.get(key)
    if (cached and cached.get("checkpoint") == checkpoint and cached.get("checkpoint_files") ==
        files and cached.get("test_data") == splits[cached["dataset"]][1]
        and "lineage" in cached):
      results[key] = cached
      continue
    graph, arrays = integer.load(folder)
    split, split_fingerprint = splits[graph["dataset"]]
    top1_percent = integer_top1(graph, arrays, split, mesh)
    results[key] = {
        top1.FIELD: top1_percent, "num_params": integer.num_params(graph),
        "checkpoint": checkpoint, "checkpoint_files": files, "step": graph["step"], "integer": True,
        "test_data": split_fingerprint, "source_checkpoint": graph["source_checkpoint"],
        # the student checkpoint it was exported from (an export older than that record: none)
        "lineage": {name: graph["source_origin"]} if graph.get("source_origin") else {},
        "export_bytes": integer.export_bytes(folder),
        **{k: graph[k] for k in integer.IDENTITY + ("dataset",) if k in graph}}
  return results


def with_staleness(results: dict, held: dict) -> dict:
  """The entries, each stale one (see stale_reasons) marked `stale` (the reason) and without
  a drop against the workdir's teacher; the others unmarked."""
  reasons = stale_reasons(results, held)
  marked = {}
  for name, entry in results.items():
    dropped = ("stale", top1.DROP_FIELD) if name in reasons else ("stale",)
    marked[name] = {k: v for k, v in entry.items() if k not in dropped}
    if name in reasons:
      marked[name]["stale"] = reasons[name]
  return marked


def check_workdir(workdir: str) -> None:
  if not storage.isdir(workdir):
    raise checkpoints.CheckpointError(f"--workdir={workdir!r} does not exist; point it at the "
                                      "folder your stages wrote.")


def run(config, workdir: str) -> dict:
  check_workdir(workdir)
  mesh = parallel.make_mesh()
  path = os.path.join(workdir, RESULTS_FILE)
  known = {}
  if storage.exists(path):
    known = json.loads(storage.read_text(path))
  splits = TestSplits(data.source(config.data))
  results = {}
  directories = checkpoint_dirs(workdir)
  main_process = training.is_main_process()
  if main_process:
    print(f"evaluate: the models of {len(directories)} checkpoint folders and the exports of "
          f"{workdir}, on the test split (a result whose checkpoint is unchanged is reused)",
          file=sys.stderr, flush=True)
  for directory in tqdm(directories, desc="evaluate", unit="folder", disable=not main_process,
                        dynamic_ncols=True, mininterval=1.0):
    signals.raise_if_stopped()
    results.update(evaluate_dir(directory, splits, mesh, known))
  results.update(evaluate_exports(workdir, splits, mesh, known))  # DIR/export/<name>
  if not results:
    raise checkpoints.CheckpointError(f"no checkpoint found in {workdir!r}; run a stage first.")
  # Entries of checkpoints that are gone (deleted, rebuilt) are dropped.
  merged = with_staleness({**{n: r for n, r in known.items() if r.get("checkpoint") and
                              storage.isdir(os.path.join(workdir, r["checkpoint"]))},
                           **results}, held=results)
  if training.is_main_process():
    storage.write_atomically(path, json.dumps(merged, indent=2, sort_keys=True))
  print(format_table({n: merged[n] for n in results}))
  return merged


def format_table(results: dict) -> str:
  lines = [f"{'model':<28} {'top-1':>8} {'params':>9} {'step':>7}"]
  for name, r in sorted(results.items()):
    lines.append(f"{name:<28} {r[top1.FIELD]:>7.2f}% {r['num_params']:>9,} {r['step']:>7}"
                 + (f"  stale: {r['stale']}" if "stale" in r else ""))
  return "\n".join(lines)
