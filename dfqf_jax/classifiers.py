"""Classifiers described by checkpoint metadata (rebuilt from it, the teacher loaded), and
their top-1 on a split: what every stage that stores, loads or scores a classifier shares."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dfqf_jax import checkpoints, data, parallel, top1
from dfqf_jax import quant as q
from dfqf_jax.models.resnet import CifarResNet

TEACHER_DIR = "teacher"


def classifier_meta(depth: int, dataset: str, mean, std, quant: q.QuantSpec | None = None,
                    **extra) -> dict:
  """Everything needed to rebuild and evaluate a classifier stored in a checkpoint."""
  return {"arch": "cifar_resnet", "depth": depth, "dataset": dataset,
          "num_classes": data.num_classes(dataset), "mean": list(mean), "std": list(std),
          "quant": None if quant is None else quant.meta(), **extra}


def classifier_from_meta(meta: dict, dtype=jnp.float32) -> CifarResNet:
  spec = q.QuantSpec.from_meta(meta)
  return CifarResNet(meta["depth"], meta["num_classes"], quant=spec, dtype=dtype)


def load_teacher(workdir: str, teacher_dir: str | None = None):
  """(model, variables, meta) of the teacher checkpoint in `teacher_dir` or DIR/teacher."""
  directory = teacher_dir or os.path.join(workdir, TEACHER_DIR)
  state, meta, _ = checkpoints.load_product(directory, "teacher")
  model = classifier_from_meta(meta)
  return model, {"params": state["params"], "batch_stats": state["batch_stats"]}, meta


def variables_of(state, path=()) -> dict:
  node = state
  for key in path:
    node = node[key]
  return {"params": node["params"], "batch_stats": node["batch_stats"]}


@functools.partial(jax.jit, static_argnums=(0,))
def count_correct(model, variables, images, labels, valid, mean, std):
  """The number of valid images that `model` classifies right: one batch of `top1_percent`."""
  logits = model.apply(variables, data.normalize(images, mean, std), train=False)
  correct = (jnp.argmax(logits, -1) == labels) & valid
  return correct.sum()


def top1_percent(model, variables, split: data.Split, mean, std, mesh,
                 batch_size: int = 1000) -> float:
  """Top-1 accuracy over a whole split, in percent (the unit of every top-1 a user reads:
  results.json, curves, tables); data-parallel, exact across devices and processes.

  The last batch is padded and masked. A split smaller than `batch_size` is one batch of
  its own size, rounded up to a multiple of the device count (not padded to `batch_size`).
  Every process holds the whole split in memory and feeds its rows of each global batch.
  """
  if len(split) == 0:
    return float("nan")
  devices = jax.device_count()
  batch_size = min(batch_size, -(-len(split) // devices) * devices)
  batch_size = max(devices, batch_size - batch_size % devices)
  variables = parallel.replicate(mesh, variables)
  rows = parallel.process_slice(batch_size)
  correct = 0
  for start in range(0, len(split), batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < len(split)
    idx = np.minimum(idx, len(split) - 1)
    batch = parallel.global_batch(mesh, {"images": split.images[idx][rows],
                                         "labels": split.labels[idx][rows],
                                         "valid": valid[rows]})
    correct += count_correct(model, variables, batch["images"], batch["labels"],
                              batch["valid"], tuple(mean), tuple(std))
  return 100.0 * float(correct) / len(split)


def top1_evaluator(model, variables_of_state, splits: dict, mean, std, mesh,
                   steps_per_epoch: int, prefix: str = ""):
  """evaluate(state, step) for training.run_steps: the epoch and `{prefix}{name}_top1_percent` of
  `model` with variables_of_state(state) on each non-empty split of `splits` (name -> split;
  None for none)."""
  def evaluate(state, step) -> dict:
    variables = variables_of_state(state)
    result = {"epoch": step / steps_per_epoch}
    for name, split in splits.items():
      if split is not None and len(split):
        result[prefix + name + top1.METRIC_SUFFIX] = top1_percent(model, variables, split,
                                                                  mean, std, mesh)
    return result

  return evaluate


def num_params(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def classifiers_in(meta: dict) -> dict:
  """name -> classifier description for a checkpoint's meta.

  A stage that stores one classifier writes its description as the meta itself (with
  `model_name`); a stage that stores several (or a classifier inside a larger state) lists
  them under `classifiers`, each with the `path` of its variables inside the state.
  """
  if "classifiers" in meta:
    return meta["classifiers"]
  if meta.get("arch") == "cifar_resnet":
    return {meta["model_name"]: meta}
  return {}


def load_stage_teacher(config, workdir: str):
  """(model, variables, meta) of the teacher a stage builds on (config.teacher_dir or
  DIR/teacher). The stage's model.depth must be the teacher's: its students have the
  teacher's depth (a quantized copy of it, or stage 1's full-precision student), so another
  one is a mistake."""
  model, variables, meta = load_teacher(workdir, config.teacher_dir)
  if config.model.depth != meta["depth"]:
    raise checkpoints.CheckpointError(
        f"the teacher checkpoint is a ResNet-{meta['depth']} but "
        f"config.model.depth={config.model.depth}; set --config.model.depth="
        f"{meta['depth']} or point teacher_dir at a ResNet-{config.model.depth}.")
  return model, variables, meta


def teacher_identity(meta: dict) -> dict:
  """What a product records of the teacher it was made for: depth, dataset, normalization."""
  return {k: meta[k] for k in ("depth", "dataset", "mean", "std")}
