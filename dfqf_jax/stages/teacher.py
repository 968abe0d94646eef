"""Stage 0: train the full-precision teacher on real data (the reference recipe by default)."""
import functools
import os

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from dfqf_jax import checkpoints, classifiers, data, parallel, rng, top1, training
from dfqf_jax.losses import cross_entropy, top1_correct
from dfqf_jax.models.resnet import CifarResNet


class TeacherState(struct.PyTreeNode):
  """The teacher's training state; `model` and `tx` ride along as static fields (as in flax's
  TrainState), so the step is step(state, batch)."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  model: nn.Module = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def train_step(state: TeacherState, batch, mean, std):
  """One SGD step on a global batch: cross-entropy, BN in training mode."""
  images = data.normalize(batch["images"], mean, std)

  def loss_fn(params):
    logits, updates = state.model.apply({"params": params, "batch_stats": state.batch_stats},
                                        images, train=True, mutable=["batch_stats"])
    return cross_entropy(logits, batch["labels"]), (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  return state, {"loss": loss,
                 "train" + top1.METRIC_SUFFIX: 100 * top1_correct(logits, batch["labels"]).mean()}


def create_state_and_step(config, steps_per_epoch: int, mesh):
  """(initial state replicated on `mesh`, jitted step(state, batch) -> (state, metrics)).

  The step's model computes in config.compute_dtype; the step logs its learning rate."""
  schedule = training.step_decay(config.learning_rate, config.lr_milestones, steps_per_epoch)
  tx = training.sgd(schedule, config.momentum, config.weight_decay)
  model = CifarResNet(config.model.depth, data.num_classes(config.data.name),
                      dtype=training.compute_dtype(config))

  def init(key):
    variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
    params = variables["params"]
    return TeacherState(jnp.zeros((), jnp.int32), params, variables["batch_stats"],
                        tx.init(params), model, tx)

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(rng.key(config.seed, rng.INIT))
  step = functools.partial(train_step, mean=tuple(config.data.mean), std=tuple(config.data.std))
  return state, training.jit_step(step, schedule)


def run(config, workdir: str) -> None:
  stage_dir = os.path.join(workdir, classifiers.TEACHER_DIR)
  mesh = parallel.make_mesh()
  train_split, val_split = data.training_splits(config.data, config.data.name, config.seed)
  test_split = data.load_split(config.data.name, "test", data.source(config.data))
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  per_epoch = data.steps_per_epoch(len(train_split), config.batch_size)
  total_steps = config.num_steps or config.num_epochs * per_epoch
  meta = classifiers.classifier_meta(config.model.depth, config.data.name, mean, std,
                                     source="trained", model_name="teacher",
                                     total_steps=total_steps, seed=config.seed)
  state, step_fn = create_state_and_step(config, per_epoch, mesh)
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = training.resume(ckpt, stage_dir, state, meta, "teacher")
  rows = parallel.process_slice(config.batch_size)

  def do_step(state, step):
    batch = data.train_batch(train_split, config.batch_size, config.seed, step, rows,
                             config.data.augment)
    return step_fn(state, parallel.global_batch(mesh, batch))

  evaluate = classifiers.top1_evaluator(
      CifarResNet(config.model.depth, data.num_classes(config.data.name)),
      lambda state: {"params": state.params, "batch_stats": state.batch_stats},
      {"test": test_split, "val": val_split}, mean, std, mesh, per_epoch)
  training.run_steps(name="teacher", ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=do_step, meta=meta,
                     log_every=config.log_every_steps, evaluate=evaluate,
                     eval_every=config.eval_every_epochs * per_epoch)
