"""One Orbax CheckpointManager per stage: `DIR/<stage>/<step>/{state,meta}`.

`state` is the stage's whole training state (exact resume); `meta` is JSON describing what
the checkpoint holds (architecture, normalization, bit widths, ...), so later stages and the
evaluator can rebuild the right model without the config that produced it. Orbax writes
each step to a temporary folder and renames it when complete, so an interrupted save never
looks like a checkpoint.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(ValueError):
  """A checkpoint that is missing, unreadable or does not fit; the message says which."""


def manager(directory: str, save_every_steps: int = 1, max_to_keep: int | None = 2):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=max(1, save_every_steps), create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def save(mngr, step: int, state, meta: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def restore(mngr, step: int, abstract_state):
  """Restores `state` with the structure, shapes and shardings of `abstract_state`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored.state, restored.meta


def resume(mngr, directory: str, state, meta: dict):
  """(state, start step): the latest checkpoint in `directory` if any, else (state, 0).

  The checkpoint's meta is checked against `meta` before any array is read, so a checkpoint
  of another model is reported, never half-restored or overwritten.
  """
  step = latest_step(directory)
  if step is None:
    return state, 0
  saved_meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  check_compatible(saved_meta, meta, directory)
  try:
    state, _ = restore(mngr, step, state)
  except Exception as e:
    raise CheckpointError(f"the checkpoint {os.path.join(directory, str(step))!r} cannot be "
                          f"restored ({type(e).__name__}); it is incomplete or does not fit "
                          "this config: delete it or use another --workdir.") from e
  return state, step


def exists(directory: str) -> bool:
  return os.path.isdir(directory) and latest_step(directory) is not None


def latest_step(directory: str) -> int | None:
  if not os.path.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(os.path.abspath(directory))
  return max(steps) if steps else None


def load_product(directory: str, what: str) -> tuple[dict, dict, int]:
  """The latest checkpoint in `directory` as host NumPy arrays: (state dict, meta, step).

  Used to read another stage's result (e.g. the teacher) whatever the device layout it was
  written with.
  """
  step = latest_step(directory)
  if step is None:
    raise CheckpointError(f"no {what} checkpoint in {directory!r}; run the {what} stage "
                          "first (or point the config at the workdir that holds it).")
  path = os.path.join(os.path.abspath(directory), str(step))
  try:
    meta = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta")
                                 ).restore(step, args=ocp.args.Composite(
                                     meta=ocp.args.JsonRestore())).meta
    checkpointer = ocp.PyTreeCheckpointer()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # reading an item folder directly warns needlessly
    try:
      tree_meta = checkpointer.metadata(os.path.join(path, "state")).item_metadata.tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  tree_meta)
      state = checkpointer.restore(os.path.join(path, "state"),
                                   args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
      logging.set_verbosity(verbosity)
  except Exception as e:
    raise CheckpointError(f"the {what} checkpoint {path!r} cannot be read ({type(e).__name__}: "
                          f"{e}); it is incomplete or corrupted: delete it or rerun the stage."
                          ) from e
  return state, meta, step


IDENTITY_KEYS = ("arch", "depth", "dataset", "num_classes", "quant", "latent_dim")


def check_compatible(saved: dict, expected: dict, directory: str) -> None:
  """Refuses to resume (or overwrite) a checkpoint written for another model."""
  for key in IDENTITY_KEYS:
    if key in expected and saved.get(key) != expected[key]:
      raise CheckpointError(
          f"{directory!r} holds a checkpoint with {key}={saved.get(key)!r}, but this run has "
          f"{key}={expected[key]!r}; use another --workdir or the matching config.")
