"""Stage 0: train the full-precision teacher on real data (the reference recipe by default)."""
import functools
import os

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dfqf_jax import checkpoints, data, parallel, training
from dfqf_jax.losses import cross_entropy, top1_correct
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import common


@struct.dataclass
class TeacherState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState


def create_state(model, tx, key) -> TeacherState:
  variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  return TeacherState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))


def train_step(model, tx, mean, std, state: TeacherState, batch):
  """One SGD step on a global batch: cross-entropy, BN in training mode."""
  images = data.normalize(batch["images"], mean, std)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                  images, train=True, mutable=["batch_stats"])
    return cross_entropy(logits, batch["labels"]), (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = TeacherState(state.step + 1, optax.apply_updates(state.params, updates),
                       batch_stats, opt_state)
  return state, {"loss": loss, "train_top1": top1_correct(logits, batch["labels"]).mean()}


def jitted_step(model, tx, schedule, mean, std):
  """The stage's step as run() dispatches it: step(state, batch) -> (state, metrics)."""
  return training.jit_step(functools.partial(train_step, model, tx, mean, std), schedule)


def run(config, workdir: str) -> None:
  stage_dir = os.path.join(workdir, common.TEACHER_DIR)
  mesh = parallel.make_mesh()
  train_split = data.load_split(config.data.name, "train", config.data.dir)
  train_split, val_split = data.train_validation_split(
      train_split, config.data.validation_size, config.seed)
  test_split = data.load_split(config.data.name, "test", config.data.dir)
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  per_epoch = data.steps_per_epoch(len(train_split), config.batch_size)
  total_steps = config.num_steps or config.num_epochs * per_epoch
  schedule = training.step_decay(config.learning_rate, config.lr_milestones, per_epoch)
  tx = training.sgd(schedule, config.momentum, config.weight_decay)
  model = CifarResNet(config.model.depth, data.num_classes(config.data.name))
  train_model = model.clone(dtype=common.compute_dtype(config))
  meta = common.classifier_meta(config.model.depth, config.data.name, mean, std,
                                source="trained", model_name="teacher",
                                total_steps=total_steps)

  replicated = parallel.replicated(mesh)
  init = jax.jit(lambda key: create_state(model, tx, key), out_shardings=replicated)
  state = init(jax.random.key(config.seed))
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = checkpoints.resume(ckpt, stage_dir, state, meta)
  if start:
    print(f"teacher: resuming from step {start}")

  step_fn = jitted_step(train_model, tx, schedule, mean, std)
  rows = parallel.process_slice(config.batch_size)

  def do_step(state, step):
    batch = data.train_batch(train_split, config.batch_size, config.seed, step, rows,
                             config.data.augment)
    return step_fn(state, parallel.global_batch(mesh, batch))

  def evaluate(state, step):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    result = {"epoch": step / per_epoch,
              "test_top1": common.top1(model, variables, test_split, mean, std, mesh)}
    if len(val_split):
      result["val_top1"] = common.top1(model, variables, val_split, mean, std, mesh)
    return result

  training.run_steps(name="teacher", ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=do_step, meta=meta,
                     log_every=config.log_every_steps, evaluate=evaluate,
                     eval_every=config.eval_every_epochs * per_epoch)
