"""Models read back from a workdir, for evaluation in Python: `dfqf_jax.load(workdir, name)`.

    student = dfqf_jax.load("runs/smoke", "student_w4a4")
    logits = student(images)            # uint8 [N, 32, 32, 3] (or float in [0, 1])
    student.top1_percent("../shared/data")  # the number results.json has for it

A name is one `evaluate` writes into results.json: the teacher, every student and PTQ model,
stage 1's full-precision student (`generator_student_fp`), every integer export
(`export_<student>`); and `generator` (stage 1's generator, which samples images).
`list_models(workdir)` gives them all. A workdir may be a local folder or `gs://...`.

What is loaded is what the stages would build on, or refused with the same one-line errors
(`errors.UserError`): an unreadable checkpoint, an unfinished one (its stage stopped before
its last step, or built from such a stage), and a stale one (built from an upstream
checkpoint, e.g. a generator, other than the one the workdir now holds). `strict=False`
reads an unfinished or stale one as it is (its `finished` says which).
"""
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfqf_jax import (checkpoints, classifiers, data, image_sources, images, integer, parallel,
                      scoring, storage)
from dfqf_jax import quant as q
from dfqf_jax.models import generator as generator_model

GENERATOR = "generator"  # the name (and stage folder) of stage 1's generator


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A model read back from a workdir.

  module: the Flax module (an export's: integer.IntegerResNet), applied as
    module.apply(variables, ...).
  meta: its description from the checkpoint (a classifier's: depth, dataset, mean, std,
    quant, calibration, ..., `origin`: step, fingerprint, finished; an export's: its
    model.json without the layers).
  lineage: upstream stage -> the origin of the checkpoint it was built from.
  finished: its stage reached its last step, and so did every stage it was built from.
  """
  name: str
  module: Any
  variables: dict
  meta: dict
  lineage: dict
  step: int
  finished: bool
  path: str  # the checkpoint (DIR/<stage>/<step>) or the export folder


class Classifier(Model):
  """A classifier: call it on images for logits; `top1_percent` scores it as results.json
  does."""

  @property
  def quant(self) -> q.QuantSpec | None:
    """Its quantization spec; None for a full-precision model."""
    return q.QuantSpec.from_meta(self.meta)

  def __call__(self, batch) -> jax.Array:
    """Logits of a batch of images [N, 32, 32, 3]: uint8, or float in [0, 1]; normalized
    here with the model's own mean and std."""
    return _logits(self.module, self.variables, _normalized(batch, self.meta))

  def top1_percent(self, data_dir: str = "") -> float:
    """Top-1 (%) on the dataset's test split in `data_dir` (default: the download cache),
    computed by the code that writes results.json's `top1_percent`."""
    split = data.load_split(self.meta["dataset"], "test", data_dir)
    return scoring.classifier_top1(self.meta, self.variables, split, parallel.make_mesh())


class IntegerClassifier(Classifier):
  """An integer export (DIR/export/<student>/), scored as results.json's `export_<student>`."""

  @property
  def quant(self) -> q.QuantSpec:
    return q.QuantSpec.of_export(self.meta)

  def top1_percent(self, data_dir: str = "") -> float:
    split = data.load_split(self.meta["dataset"], "test", data_dir)
    return scoring.integer_top1(self.module.graph, self.variables, split, parallel.make_mesh())


class GeneratorModel(Model):
  """Stage 1's generator: `sample(n, seed)` gives images as the teacher sees them."""

  def sample(self, n: int, seed: int = 0) -> np.ndarray:
    """n images, uint8 [n, 32, 32, 3], from latents drawn with `seed`. The generator's BNs
    normalize with the batch's statistics (as stage 1 trained it and fine-tuning draws
    from it), so the images depend on n as well as on the seed."""
    x = _generate(self.module, self.variables, jax.random.key(seed), n)
    teacher = self.meta["teacher"]
    return images.denormalize(x, teacher["mean"], teacher["std"])


@functools.partial(jax.jit, static_argnums=0)
def _logits(module, variables, x):
  return module.apply(variables, x, train=False)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(module, variables, key, n: int):
  return image_sources.generate(module, variables, key, n)


def _normalized(batch, meta: dict) -> jax.Array:
  """uint8 images as the evaluation normalizes them (data.normalize); float ones in [0, 1]."""
  batch = jnp.asarray(batch)
  if batch.dtype == jnp.uint8:
    return data.normalize(batch, meta["mean"], meta["std"])
  mean, std = (jnp.asarray(meta[k], jnp.float32) for k in ("mean", "std"))
  return (batch.astype(jnp.float32) - mean) / std


# --- what a workdir holds -----------------------------------------------------------------
def _catalog(workdir: str) -> dict[str, tuple[str, str]]:
  """name -> (kind, folder): 'classifier' and 'generator' in a stage folder, 'export' in
  DIR/export/<student>. Reads only the checkpoints' metadata."""
  catalog = {}
  for directory in scoring.checkpoint_dirs(workdir):
    meta = checkpoints.read_meta(directory, checkpoints.latest_step(directory))
    if meta.get("arch") == "dafl_generator":
      catalog[os.path.basename(directory)] = (GENERATOR, directory)
    for name in classifiers.classifiers_in(meta):
      catalog[name] = ("classifier", directory)
  for student, folder in scoring.export_dirs(workdir).items():
    catalog[scoring.EXPORT_PREFIX + student] = ("export", folder)
  return catalog


def _check_workdir(workdir) -> str:
  """`workdir` (a str or path-like) as a str, if it exists."""
  workdir = os.fspath(workdir)
  if not storage.isdir(workdir):
    raise checkpoints.CheckpointError(f"the workdir {workdir!r} does not exist; give the folder "
                                      "your stages wrote (their --workdir).")
  return workdir


def list_models(workdir) -> list[str]:
  """The names `load` accepts for `workdir`."""
  return sorted(_catalog(_check_workdir(workdir)))


# --- loading ------------------------------------------------------------------------------
def _load_checkpoint_model(name: str, kind: str, directory: str):
  state, meta, step = checkpoints.load_product(directory, os.path.basename(directory))
  fields = dict(name=name, lineage=meta.get("lineage", {}), step=step,
                finished=meta[checkpoints.ORIGIN]["finished"],
                path=os.path.join(directory, str(step)))
  if kind == GENERATOR:
    return GeneratorModel(module=generator_model.from_meta(meta), variables=state["generator"],
                          meta=meta, **fields)
  entry = {**classifiers.classifiers_in(meta)[name], checkpoints.ORIGIN: meta[checkpoints.ORIGIN],
           "total_steps": meta.get("total_steps")}
  return Classifier(module=classifiers.classifier_from_meta(entry), meta=entry,
                    variables=classifiers.variables_of(state, entry.get("path", ())), **fields)


def _load_export(name: str, folder: str) -> IntegerClassifier:
  graph, arrays = integer.load(folder)
  source = graph.get("source_origin")  # absent from exports older than lineages
  return IntegerClassifier(
      name=name, module=integer.IntegerResNet(graph), variables=arrays,
      meta={k: v for k, v in graph.items() if k not in ("layers", "arrays")},
      lineage={graph["name"]: source} if source else {}, step=graph["step"],
      finished=source["finished"] if source else True, path=folder)


def _upstream(workdir: str, lineage: dict) -> dict:
  """stage -> {origin, lineage} of every checkpoint of `workdir` that `lineage` names, and of
  those they were built from, recursively (as scoring.stale_reasons reads them)."""
  held, todo = {}, list(lineage)
  while todo:
    stage = todo.pop()
    directory = os.path.join(workdir, stage)
    if stage in held or not checkpoints.exists(directory):
      continue
    _, meta, _ = checkpoints.load_product(directory, stage)
    held[stage] = {checkpoints.ORIGIN: meta[checkpoints.ORIGIN],
                   "lineage": meta.get("lineage", {})}
    todo.extend(held[stage]["lineage"])
  return held


def _check_current(model, workdir: str) -> None:
  """Refuses a model that is unfinished or stale (see the module's docstring)."""
  fix = "or load it with strict=False to read it as it is."
  if not model.finished:
    total = model.meta.get("total_steps")
    if total is not None and model.step < total:
      raise checkpoints.CheckpointError(
          f"{model.name} in {workdir!r} is unfinished: its checkpoint {model.path!r} is at step "
          f"{model.step} of {total}; rerun its stage to finish it, {fix}")
    unfinished = [checkpoints.describe_origin(e) for e in model.lineage.values()
                  if not e["finished"]]
    raise checkpoints.CheckpointError(
        f"{model.name} in {workdir!r} was built from an unfinished "
        f"{', '.join(unfinished) or 'upstream stage'}; rerun the pipeline (it rebuilds it), "
        + fix)
  held = _upstream(workdir, model.lineage)
  reason = scoring.stale_reasons({**held, model.name: {"lineage": model.lineage}},
                                  held).get(model.name)
  if reason:
    raise checkpoints.CheckpointError(
        f"{model.name} in {workdir!r} is stale: {reason}; rerun the pipeline (it rebuilds "
        f"it), {fix}")


def load(workdir, name: str, strict: bool = True) -> Model:
  """The model `name` of `workdir` (see `list_models`): a Classifier (an IntegerClassifier
  for `export_<student>`) or, for `generator`, a GeneratorModel. strict=False also reads an
  unfinished or stale one."""
  workdir = _check_workdir(workdir)
  catalog = _catalog(workdir)
  if name not in catalog:
    raise checkpoints.CheckpointError(
        f"{workdir!r} holds no model {name!r}; it holds {sorted(catalog) or 'none'} (run the "
        "stage that makes it first).")
  kind, folder = catalog[name]
  model = (_load_export(name, folder) if kind == "export" else
           _load_checkpoint_model(name, kind, folder))
  if strict:
    _check_current(model, workdir)
  return model
