"""Stage 0 alternative: import a pretrained PyTorch CIFAR ResNet as the teacher checkpoint."""
import os

import jax
import jax.numpy as jnp

from dfqf_jax import checkpoints, classifiers, convert, data, signals


def run(config, workdir: str) -> None:
  state_dict, source = convert.load_state_dict(config.weights)
  variables = convert.torch_resnet_to_flax(state_dict, config.model.depth,
                                           data.num_classes(config.data.name))
  meta = classifiers.classifier_meta(config.model.depth, config.data.name, config.data.mean,
                                     config.data.std, source=source, model_name="teacher",
                                     total_steps=0)
  stage_dir = os.path.join(workdir, classifiers.TEACHER_DIR)
  if checkpoints.exists(stage_dir):
    _, saved_meta, _ = checkpoints.load_product(stage_dir, "teacher")
    checkpoints.check_compatible(saved_meta, meta, stage_dir)
    if saved_meta.get("source") == meta["source"]:
      print(f"teacher: {stage_dir} already holds these weights; nothing to do.")
      return
    raise checkpoints.CheckpointError(
        f"{stage_dir!r} already holds a teacher from {saved_meta.get('source')!r}; use "
        "another --workdir (existing checkpoints are never overwritten).")
  state = jax.tree.map(jnp.asarray, variables)
  with signals.deferred():
    checkpoints.save_once(stage_dir, state, meta)
  print(f"teacher: imported {config.weights} ({classifiers.num_params(state['params']):,} "
        f"parameters) into {stage_dir}")
