"""ZeroQ's distilled data: a fixed image set for the student, in place of DFQF's generator.

num_batches batches of batch_size images start as noise (in the teacher's normalized input
space). Each batch is optimized on its own, as ZeroQ's getDistilData does: `iterations`
PyTorch-Adam steps on its loss (baselines.zeroq_image_losses averaged over the batch), the
learning rate lowered by ReduceLROnPlateau on that loss. `concurrent_batches` batches share
one forward pass; each keeps its own Adam moments, step count and schedule, so the result
does not depend on how many run at once. Step s of the stage is iteration s % iterations
of group s // iterations. The product is the image set; fine-tuning draws batches from it.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dfqf_jax import (baselines, checkpoints, classifiers, data, image_sources, parallel, rng,
                      training, validation)
from dfqf_jax.models.resnet import CifarResNet

STAGE_DIR = image_sources.SOURCES["zeroq"].stage_dir
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as distill_data.py uses them
ADAM_EPS = 1e-8
PLATEAU_EPS = 1e-8  # ReduceLROnPlateau ignores a reduction smaller than this
# The best loss before the first iteration (PyTorch's inf; finite, as saved states must be).
NO_LOSS_YET = float(np.finfo(np.float32).max)


class Hyper(struct.PyTreeNode):
  iterations: int = struct.field(pytree_node=False)
  concurrent_batches: int = struct.field(pytree_node=False)
  input_statistics: bool = struct.field(pytree_node=False)
  plateau_patience: int = struct.field(pytree_node=False)
  plateau_factor: float = struct.field(pytree_node=False)
  plateau_threshold: float = struct.field(pytree_node=False)
  min_learning_rate: float = struct.field(pytree_node=False)


class ZeroqState(struct.PyTreeNode):
  """The images [num_batches, batch, H, W, C] with, per batch, Adam's moments and step
  count and the plateau schedule's learning rate, best loss and count of bad iterations."""
  step: jax.Array
  images: jax.Array
  mu: jax.Array
  nu: jax.Array
  adam_count: jax.Array
  learning_rate: jax.Array
  best_loss: jax.Array
  bad_iterations: jax.Array
  hp: Hyper = struct.field(pytree_node=False)


def initial_images(config, key, image_shape=(32, 32, 3)):
  shape = (config.num_batches, config.batch_size, *image_shape)
  if config.init == "gaussian":
    return jax.random.normal(key, shape, jnp.float32)
  return (jax.random.randint(key, shape, 0, 255).astype(jnp.float32) - 127.5) / 5418.75


def initial_state(config, key) -> ZeroqState:
  images = initial_images(config, key)
  per_batch = lambda value, dtype: jnp.full((config.num_batches,), value, dtype)
  hp = Hyper(config.iterations, config.concurrent_batches, config.input_statistics,
             config.plateau_patience, config.plateau_factor, config.plateau_threshold,
             config.min_learning_rate)
  return ZeroqState(jnp.zeros((), jnp.int32), images, jnp.zeros_like(images),
                    jnp.zeros_like(images), per_batch(0, jnp.int32),
                    per_batch(config.learning_rate, jnp.float32),
                    per_batch(NO_LOSS_YET, jnp.float32), per_batch(0, jnp.int32), hp)


def adam_update(x, grad, mu, nu, count, learning_rate):
  """One torch.optim.Adam step (no weight decay) per batch: count and learning_rate are
  [batches], the rest [batches, ...]."""
  b1, b2 = ADAM_BETAS
  mu = b1 * mu + (1 - b1) * grad
  nu = b2 * nu + (1 - b2) * jnp.square(grad)
  count = count + 1
  expand = lambda v: v.reshape(v.shape + (1,) * (x.ndim - 1))
  correction1 = 1 - b1 ** expand(count).astype(jnp.float32)
  correction2 = 1 - b2 ** expand(count).astype(jnp.float32)
  denominator = jnp.sqrt(nu) / jnp.sqrt(correction2) + ADAM_EPS
  return x - expand(learning_rate) / correction1 * mu / denominator, mu, nu, count


def plateau_update(loss, learning_rate, best, bad, hp: Hyper):
  """torch ReduceLROnPlateau.step(loss) per batch (mode 'min', relative threshold, no
  cooldown): after more than `patience` iterations without a new best, lr *= factor (not
  below min_learning_rate)."""
  improved = loss < best * (1 - hp.plateau_threshold)
  best = jnp.where(improved, loss, best)
  bad = jnp.where(improved, 0, bad + 1)
  reduce = bad > hp.plateau_patience
  lowered = jnp.maximum(learning_rate * hp.plateau_factor, hp.min_learning_rate)
  learning_rate = jnp.where(reduce & (learning_rate - lowered > PLATEAU_EPS), lowered,
                            learning_rate)
  return learning_rate, best, jnp.where(reduce, 0, bad)


def train_step(state: ZeroqState, teacher: CifarResNet, teacher_vars):
  """One ZeroQ iteration of the current group of batches."""
  hp = state.hp
  k = hp.concurrent_batches
  first = (state.step // hp.iterations) * k
  take = lambda a: jax.lax.dynamic_slice_in_dim(a, first, k)
  put = lambda a, part: jax.lax.dynamic_update_slice_in_dim(a, part, first, 0)
  images = take(state.images)
  batch_shape = images.shape

  def loss_fn(images):
    x = images.reshape(-1, *batch_shape[2:])
    _, layers = baselines.teacher_bn_inputs(teacher, teacher_vars, x)
    losses = baselines.zeroq_image_losses(x, layers, hp.input_statistics)
    batch_losses = losses.reshape(batch_shape[:2]).mean(1)
    return batch_losses.sum(), batch_losses

  (_, batch_losses), grad = jax.value_and_grad(loss_fn, has_aux=True)(images)
  learning_rate = take(state.learning_rate)
  images, mu, nu, count = adam_update(images, grad, take(state.mu), take(state.nu),
                                      take(state.adam_count), learning_rate)
  lowered, best, bad = plateau_update(batch_losses, learning_rate, take(state.best_loss),
                                      take(state.bad_iterations), hp)
  new_state = state.replace(
      step=state.step + 1, images=put(state.images, images), mu=put(state.mu, mu),
      nu=put(state.nu, nu), adam_count=put(state.adam_count, count),
      learning_rate=put(state.learning_rate, lowered), best_loss=put(state.best_loss, best),
      bad_iterations=put(state.bad_iterations, bad))
  return new_state, {"loss_bn": batch_losses.mean(), "learning_rate": learning_rate.mean()}


def total_steps_of(config) -> int:
  return config.iterations * (config.num_batches // config.concurrent_batches)


def stage_meta(config, teacher_meta) -> dict:
  return {"arch": "zeroq_images", "num_images": config.num_batches * config.batch_size,
          "teacher": classifiers.teacher_identity(teacher_meta),
          "settings": {k: config[k] for k in (
              "batch_size", "iterations", "learning_rate", "plateau_patience", "plateau_factor",
              "plateau_threshold", "min_learning_rate", "input_statistics", "init")}}


def load_images(workdir: str):
  """(images [N, H, W, C] in the teacher's normalized input space, meta) of DIR/zeroq's
  finished distillation."""
  stage_dir = os.path.join(workdir, STAGE_DIR)
  state, meta, step = checkpoints.load_product(stage_dir, "zeroq")
  if step != meta["total_steps"]:
    raise checkpoints.CheckpointError(
        f"ZeroQ's distillation in {stage_dir!r} stopped at step {step} of "
        f"{meta['total_steps']}; rerun the zeroq stage to finish it.")
  images = np.asarray(state["images"])
  return images.reshape(-1, *images.shape[2:]), meta


def run(config, workdir: str) -> None:
  stage_dir = os.path.join(workdir, STAGE_DIR)
  teacher, teacher_vars, teacher_meta = classifiers.load_stage_teacher(config, workdir)
  lineage = {"teacher": teacher_meta[checkpoints.ORIGIN]}
  total_steps = total_steps_of(config)
  meta = {**stage_meta(config, teacher_meta), "total_steps": total_steps, "lineage": lineage,
          "seed": config.seed}
  checkpoints.check_lineage(stage_dir, "zeroq", lineage, config.on_stale_upstream)
  state = jax.jit(lambda key: initial_state(config, key))(rng.key(config.seed, rng.INIT))
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = training.resume(ckpt, stage_dir, state, meta, "zeroq")
  step_fn = jax.jit(lambda state, tv: train_step(state, teacher, tv), donate_argnums=0)
  training.run_steps(name="zeroq", ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=lambda s, _: step_fn(s, teacher_vars),
                     meta=meta, log_every=config.log_every_steps, loss_keys=("loss_bn",))


def finetune_source(config, workdir: str, mesh) -> image_sources.ImageSource:
  """The distilled images of DIR/zeroq for a fine-tuning config: the first
  calibration_batches x calibration_batch_size calibrate the start; each step's batch is
  drawn from all of them, a fresh permutation per pass (data.train_batch_indices), as they
  are (no augmentation: ZeroQ defines none)."""
  images, meta = load_images(workdir)
  needed = max(config.batch_size, config.calibration_batches * config.calibration_batch_size)
  if len(images) < needed:
    raise validation.ConfigError(
        f"DIR/zeroq holds {len(images)} images, fewer than fine-tuning's batch_size "
        f"({config.batch_size}) or calibration_batches x calibration_batch_size "
        f"({config.calibration_batches} x {config.calibration_batch_size}); distill more "
        "(zeroq's num_batches) or lower those.")
  size = config.calibration_batch_size
  rows = parallel.process_slice(config.batch_size)

  def inputs(step, base_key):
    idx = data.train_batch_indices(len(images), config.batch_size, config.seed, step)
    return parallel.global_batch(mesh, {"images": images[idx][rows]})["images"]

  return image_sources.ImageSource(
      lineage={STAGE_DIR: meta[checkpoints.ORIGIN]},
      calibration_batches=lambda config, key: [images[i * size:(i + 1) * size]
                                               for i in range(config.calibration_batches)],
      generator=None, hyper=None, step=None, inputs=inputs)
