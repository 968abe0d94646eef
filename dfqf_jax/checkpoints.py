"""One Orbax CheckpointManager per stage: `DIR/<stage>/<step>/{state,meta}`.

`state` is the stage's whole training state (exact resume); `meta` is JSON describing what
the checkpoint holds (architecture, normalization, bit widths, ...), so later stages and the
evaluator can rebuild the right model without the config that produced it. Orbax writes
each step to a temporary folder and renames it when complete, so an interrupted save never
looks like a checkpoint.
"""
import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dfqf_jax import storage
from dfqf_jax.errors import UserError, brief
from dfqf_jax.models.generator import REFERENCE_WIDTH


# Replica-parallel saving slices every replicated array on its devices before writing, and
# each slice is a small eager program compiled per shape: seconds per save for our small
# states. Only arrays of at least this size are split among replicas.
MIN_BYTES_FOR_REPLICA_PARALLEL_SAVE = 16 * 2**20


def _register_array_handler() -> None:
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns about every override of its defaults
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_BYTES_FOR_REPLICA_PARALLEL_SAVE),
        override=True)
  finally:
    logging.set_verbosity(verbosity)


_register_array_handler()


class CheckpointError(UserError, ValueError):
  """A checkpoint that is missing, unreadable or does not fit; the message says which."""


# Checkpoints a stage keeps: the latest and the one before it (what a rerun resumes from if
# the latest was cut short).
KEPT_CHECKPOINTS = 2


def manager(directory: str, save_every_steps: int = 1):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=KEPT_CHECKPOINTS, save_interval_steps=max(1, save_every_steps), create=True)
  return ocp.CheckpointManager(storage.absolute(directory), options=options,
                               item_names=("state", "meta"))


def save(mngr, step: int, state, meta: dict, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=force)


def save_once(directory: str, state, meta: dict) -> None:
  """Saves a product made in one go (an imported or calibrated model) as step 0 of
  `directory`, and returns once it is on storage."""
  mngr = manager(directory)
  save(mngr, 0, state, meta, force=True)
  mngr.wait_until_finished()
  mngr.close()


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
                          f"restored ({brief(e)}); it is incomplete or does not fit this "
                          "config: delete it or use another --workdir.") from e
  return state, step


def exists(directory: str) -> bool:
  return storage.isdir(directory) and latest_step(directory) is not None


def latest_step(directory: str) -> int | None:
  if not storage.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(storage.absolute(directory))
  return max(steps) if steps else None


def load_product(directory: str, what: str) -> tuple[dict, dict, int]:
  """The latest checkpoint in `directory` as host NumPy arrays: (state dict, meta, step),
  the meta with the checkpoint's `origin` added (see lineage below).

  Used to read another stage's result (e.g. the teacher) whatever the device layout it was
  written with.
  """
  step = latest_step(directory)
  if step is None:
    raise CheckpointError(f"no {what} checkpoint in {directory!r}; run the {what} stage "
                          "first (or point the config at the workdir that holds it).")
  path = os.path.join(storage.absolute(directory), str(step))
  try:
    meta = read_meta(directory, step)
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
    raise CheckpointError(f"the {what} checkpoint {path!r} cannot be read ({brief(e)}); it is "
                          "incomplete or corrupted: delete it or rerun the stage.") from e
  return state, {**meta, ORIGIN: origin(what, step, state, meta)}, step


# -- lineage -------------------------------------------------------------------------------
# A stage's meta records `total_steps` (its schedule) and `lineage`: for each upstream stage
# it read, the `origin` of that checkpoint (step, fingerprint of its state, whether it was
# finished). `load_product` attaches the origin of what it loads under ORIGIN (not stored).
ORIGIN = "origin"


def fingerprint(tree) -> str:
  """A short hash of every array of a checkpoint's state (paths, dtypes, shapes, bytes)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def is_finished(meta: dict, step: int) -> bool:
  """Its final step is saved and everything it was built from was finished."""
  total = meta.get("total_steps")
  return (total is not None and step >= total
          and all(entry["finished"] for entry in meta.get("lineage", {}).values()))


def origin(what: str, step: int, state, meta: dict) -> dict:
  """What a stage built on this checkpoint records of it (its seed, where recorded: a stage
  run on its own may build on another seed's product, and its lineage says so)."""
  return {"stage": what, "step": int(step), "fingerprint": fingerprint(state),
          "finished": is_finished(meta, step),
          **({"seed": meta["seed"]} if "seed" in meta else {})}


def describe_origin(entry: dict) -> str:
  return (f"{entry['stage']} step {entry['step']} ({entry['fingerprint'][:8]}"
          f"{'' if entry['finished'] else ', unfinished'})")


def read_meta(directory: str, step: int) -> dict:
  return ocp.CheckpointManager(storage.absolute(directory), item_names=("state", "meta")
                               ).restore(step, args=ocp.args.Composite(
                                   meta=ocp.args.JsonRestore())).meta


def check_lineage(directory: str, name: str, lineage: dict, on_stale: str) -> None:
  """Before a stage resumes or skips its checkpoint in `directory`: that checkpoint must have
  been built from exactly the upstream checkpoints in `lineage` (stage -> origin). If not,
  it is neither resumed nor kept: on_stale='rebuild' deletes it (one line says why), 'stop'
  raises with the fix."""
  step = latest_step(directory)
  if step is None:
    return
  saved = read_meta(directory, step).get("lineage")
  fingerprints = lambda entries: {k: v["fingerprint"] for k, v in (entries or {}).items()}
  if saved is not None and fingerprints(saved) == fingerprints(lineage):
    return
  describe = lambda entries: ", ".join(describe_origin(entries[k]) for k in sorted(entries))
  was = describe(saved) if saved else "unrecorded inputs"
  now = describe(lineage)
  reason = f"{name} in {directory!r} was built from {was}, but the workdir now holds {now}"
  if on_stale != "rebuild":
    raise CheckpointError(f"{reason}; delete that folder to rebuild it (the pipeline does "
                          "this itself), or use another --workdir.")
  print(f"{reason}: rebuilding it.")
  if jax.process_index() == 0:
    storage.rmtree(directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"rebuild {directory}")


IDENTITY_KEYS = ("arch", "depth", "dataset", "num_classes", "quant", "latent_dim", "width")
# Per arch, identity keys recorded later than its first checkpoints: the value every older
# one had.
WHEN_UNRECORDED = {"dafl_generator": {"width": REFERENCE_WIDTH},
                   "gdfq_generator": {"width": REFERENCE_WIDTH}}


def check_seed(saved: dict, expected: dict, directory: str) -> None:
  """Refuses to resume (or keep) a checkpoint of another seed's random streams. A checkpoint
  written before they recorded their seed may be of any seed; only seed 0's streams are the
  same since (rng.py), so it resumes only with seed 0."""
  if "seed" not in expected or saved.get("seed", 0) == expected["seed"]:
    return
  if "seed" in saved:
    raise CheckpointError(
        f"{directory!r} holds a checkpoint of seed {saved['seed']}, but this run has seed "
        f"{expected['seed']}; use --config.seed={saved['seed']} or another --workdir.")
  raise CheckpointError(
      f"{directory!r} holds a checkpoint that does not record its seed (written before "
      f"2026-12-06, when seeds >= 1 drew other random streams); resuming it with seed "
      f"{expected['seed']} would not continue it: delete it or use another --workdir.")


def check_compatible(saved: dict, expected: dict, directory: str) -> None:
  """Refuses to resume (or overwrite) a checkpoint written for another model or seed."""
  assumed = WHEN_UNRECORDED.get(saved.get("arch"), {})
  for key in IDENTITY_KEYS:
    value = saved.get(key, assumed.get(key))
    if key in expected and value != expected[key]:
      said = "" if key in saved else " (not recorded: that of every checkpoint written before)"
      raise CheckpointError(
          f"{directory!r} holds a checkpoint with {key}={value!r}{said}, but this run has "
          f"{key}={expected[key]!r}; use another --workdir or the matching config.")
  check_seed(saved, expected, directory)