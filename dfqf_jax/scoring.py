"""What evaluation (stages/evaluate.py) and the read-back API (readback.py) share: the
models a workdir holds, the top-1 of each as results.json records it, and which of them
were built from inputs the workdir no longer holds (stale)."""
import os

from dfqf_jax import checkpoints, classifiers, data, integer, storage

RESULTS_FILE = "results.json"  # every model of a workdir, scored (stages/evaluate.py)
EXPORT_PREFIX = "export_"  # results.json's name of DIR/export/<name>: export_<name>


def checkpoint_dirs(workdir: str) -> list[str]:
  """Every stage folder of DIR that holds at least one checkpoint."""
  dirs = (os.path.join(workdir, entry) for entry in storage.listdir(workdir))
  return [d for d in dirs if checkpoints.exists(d)]


def export_dirs(workdir: str) -> dict[str, str]:
  """student -> DIR/export/<student>, for every such folder that holds an integer model."""
  root = os.path.join(workdir, integer.EXPORT_DIR)
  names = storage.listdir(root) if storage.isdir(root) else []
  return {name: os.path.join(root, name) for name in names if not name.startswith(".")
          and storage.isfile(os.path.join(root, name, integer.GRAPH_FILE))}


def classifier_top1(entry: dict, variables: dict, split: data.Split, mesh) -> float:
  """Top-1 (%) on `split` of the classifier that `entry` (its checkpoint's description)
  names, with `variables`: its results.json number (also dfqf_jax.load's top1_percent)."""
  return classifiers.top1_percent(classifiers.classifier_from_meta(entry), variables, split,
                                  entry["mean"], entry["std"], mesh)


def integer_top1(graph: dict, arrays: dict, split, mesh) -> float:
  """Top-1 (%) on `split` of the integer model (graph, arrays) that integer.load gives: its
  results.json number (also dfqf_jax.load's top1_percent)."""
  return classifiers.top1_percent(integer.IntegerResNet(graph), arrays, split, graph["mean"],
                                  graph["std"], mesh, batch_size=min(1000, len(split)))


def stale_reasons(results: dict, held: dict) -> dict[str, str]:
  """name -> why, for each entry of `results` built from an upstream checkpoint (its
  `lineage`: stage -> origin) other than the one the workdir now holds under that stage (the
  `origin` of the `held` entries, those evaluated from the workdir's checkpoints now), or
  built from a stage whose model is itself stale (an export of a stale student). Such a
  model is left over from earlier inputs: a stage rerun alone (a generator trained further,
  a teacher replaced) rebuilds nothing downstream, and a pipeline rebuilds only the students
  and PTQ models it is asked for."""
  holders = {r[checkpoints.ORIGIN]["stage"]: name
             for name, r in held.items() if checkpoints.ORIGIN in r}
  current = {stage: held[name][checkpoints.ORIGIN] for stage, name in holders.items()}
  reasons = {}
  for name, entry in results.items():
    changed = [(upstream, current[stage]) for stage, upstream in entry.get("lineage", {}).items()
               if stage in current and current[stage]["fingerprint"] != upstream["fingerprint"]]
    if changed:
      reasons[name] = "; ".join(
          f"built from {checkpoints.describe_origin(was)}, but the workdir now holds "
          f"{checkpoints.describe_origin(now)}" for was, now in changed)
  spreading = True
  while spreading:  # down the chain: teacher -> generator -> student -> export
    spreading = False
    for name, entry in results.items():
      stale_upstream = [holders[stage] for stage in entry.get("lineage", {})
                        if holders.get(stage) in reasons]
      if name not in reasons and stale_upstream:
        reasons[name] = f"built from {stale_upstream[0]}, itself stale: " + reasons[
            stale_upstream[0]]
        spreading = True
  return reasons
