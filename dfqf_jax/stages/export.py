"""Integer deployment: export a quantized student as integer codes (`dfqf_jax.integer`).

python main.py --config=configs/export.py --workdir=DIR [--config.student=student_w4a4]
reads the checkpoint DIR/<student> (a finetune or ptq product) and writes
DIR/export/<student>/: model.json (the graph), weights.npz (integer weight codes, scales,
zero points, activation clips and steps, batch norm folded into per-channel scale and bias)
and model.stablehlo (the integer forward pass as a `jax.export` artifact). The folder is
written under a temporary name and renamed when complete. `evaluate` scores every export
as `export_<student>` in DIR/results.json.
"""
import io
import json
import os
import shutil
import tempfile

import numpy as np
from flax import traverse_util

from dfqf_jax import checkpoints, classifiers, integer, signals, storage, training, validation
from dfqf_jax import quant as q

EXPORT_DIR = integer.EXPORT_DIR


def quantized_models(workdir: str) -> list[str]:
  """Folders of `workdir` whose checkpoint holds a quantized classifier (for messages)."""
  names = []
  for entry in storage.listdir(workdir) if storage.isdir(workdir) else []:
    directory = os.path.join(workdir, entry)
    if entry != EXPORT_DIR and checkpoints.exists(directory) and (
        entry.startswith(("student_", "ptq_", "qat_real_"))):
      names.append(entry)
  return names


def load_student(workdir: str, name: str):
  """(spec, variables, classifier description, checkpoint path, step) of DIR/<name>."""
  directory = os.path.join(workdir, name)
  if not checkpoints.exists(directory):
    raise checkpoints.CheckpointError(
        f"no checkpoint {directory!r} to export; quantized models in {workdir!r}: "
        f"{quantized_models(workdir) or 'none'} (run the finetune or ptq stage first, or set "
        "--config.student).")
  state, meta, step = checkpoints.load_product(directory, name)
  entries = classifiers.classifiers_in(meta)
  entry = entries.get(name) or (next(iter(entries.values())) if len(entries) == 1 else None)
  if entry is None:
    raise checkpoints.CheckpointError(
        f"the checkpoint {directory!r} holds no classifier named {name!r} (it holds "
        f"{sorted(entries) or 'none'}); export a quantized student, e.g. student_w4a4.")
  entry = {**entry, "source_origin": meta.get(checkpoints.ORIGIN)}
  spec = q.QuantSpec.from_meta(entry)
  integer.check_exportable(spec, f"the checkpoint {name!r}")
  variables = classifiers.variables_of(state, entry.get("path", ()))
  return spec, variables, entry, os.path.join(directory, str(step)), step


def float32_bytes(variables: dict) -> int:
  """Size of the float32 model in the same container (an .npz of its parameters and batch
  statistics, clips left out)."""
  flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
      {"params": variables["params"], "batch_stats": variables["batch_stats"]}).items()
          if not q.is_clip(k)}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  return buffer.tell()


def _check_not_other_model(out: str, graph: dict) -> None:
  """An existing export of another bit width / protocol / depth is reported, never replaced."""
  if not storage.exists(out):
    return
  try:
    existing = json.loads(storage.read_text(os.path.join(out, integer.GRAPH_FILE)))
  except (OSError, ValueError):
    existing = {}
  differs = {k: (existing.get(k), graph.get(k)) for k in integer.IDENTITY
             if existing.get(k) != graph.get(k)}
  if differs:
    what = ", ".join(f"{k}={old!r} (this model: {new!r})" for k, (old, new) in differs.items())
    raise checkpoints.CheckpointError(
        f"{out!r} holds an export of another model ({what}); it is not overwritten: delete it "
        "or export into another --workdir.")


def _swap(tmp: str, out: str, root: str, name: str) -> None:
  """Local: the finished folder replaces `out` by renames (readers never see a mix)."""
  old = None
  if os.path.exists(out):
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=root)
    os.replace(out, os.path.join(old, name))
  os.replace(tmp, out)
  if old:
    shutil.rmtree(old)


def _upload(tmp: str, out: str, root: str, name: str) -> None:
  """Cloud Storage (no renames): the files are copied with model.json last, the file whose
  presence makes a folder an export."""
  if storage.exists(out):
    storage.rmtree(out)
  files = sorted(os.listdir(tmp), key=lambda n: n == integer.GRAPH_FILE)
  for file in files:
    storage.copyfile(os.path.join(tmp, file), os.path.join(out, file))


def run(config, workdir: str) -> dict:
  name = config.student
  spec, variables, entry, checkpoint, step = load_student(workdir, name)
  if config.bits:
    (w, a), = validation.bit_pairs(config)
    if (w, a) != (spec.weight_bits, spec.act_bits):
      raise checkpoints.CheckpointError(
          f"config.bits={config.bits!r} but the checkpoint {name!r} is W{spec.weight_bits}"
          f"A{spec.act_bits}; leave config.bits empty or export the matching student.")
  graph, arrays = integer.build(variables, spec, entry["depth"], entry["num_classes"])
  graph.update(name=name, source_checkpoint=storage.absolute(checkpoint), step=step,
               dataset=entry["dataset"], mean=list(entry["mean"]), std=list(entry["std"]),
               input={"dtype": "uint8", "layout": "NHWC", "shape": [None, 32, 32, 3],
                      "normalize": "(x / 255 - mean) / std"},
               calibration=entry.get("calibration"),
               source_origin=entry["source_origin"])
  root = os.path.join(workdir, EXPORT_DIR)
  out = os.path.join(root, name)
  _check_not_other_model(out, graph)
  float_size = float32_bytes(variables)
  if not training.is_main_process():
    return {}
  remote = storage.is_remote(root)
  storage.makedirs(root)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=None if remote else root)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is not
  try:
    integer.save(tmp, graph, arrays)
    with open(os.path.join(tmp, integer.STABLEHLO_FILE), "wb") as f:
      f.write(integer.serialize(graph, arrays, graph["mean"], graph["std"]))
    integer.load(tmp)  # readable and consistent before it takes the final name
    with signals.deferred():  # the old export or the new one, never half of each
      (_upload if remote else _swap)(tmp, out, root, name)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  sizes = {"export_bytes": integer.export_bytes(out),
           "stablehlo_bytes": storage.getsize(os.path.join(out, integer.STABLEHLO_FILE)),
           "float32_bytes": float_size}
  print(f"export: wrote {out} (W{spec.weight_bits}A{spec.act_bits}, {spec.protocol}, "
        f"{len(graph['layers'])} layers): {integer.WEIGHTS_FILE} + {integer.GRAPH_FILE} "
        f"{sizes['export_bytes']:,} bytes vs {float_size:,} bytes for the float32 model "
        f"({float_size / sizes['export_bytes']:.1f}x smaller); {integer.STABLEHLO_FILE} "
        f"{sizes['stablehlo_bytes']:,} bytes")
  return sizes
