"""Stage 1: train the DAFL generator against the frozen teacher (DFQF's DFKD warm-up).

Per iteration, on one batch z ~ N(0, I):
  x = G(z) (G's BNs in training mode); t = T(x) (T's BNs in inference mode, recording the
  batch mean / unbiased variance at every BN input); s = S(x) (S's BNs in training mode);
  G descends L_G = L_IS + lambda_bn L_BN - lambda_adv KL(t || s)   (Adam);
  S descends KL(t || s) on the same, detached images (SGD with step decay).
Both updates use the parameters from before the iteration. The product is the last generator.

With `single_student_pass` (default) one backward pass gives both gradients: L_G depends on
the student's parameters only through -lambda_adv KL(t || s), and KL's gradient w.r.t. the
student does not depend on whether t and x are detached, so dKL/dθ_S = -dL_G/dθ_S / lambda_adv.
The reference code runs the student twice (once per loss); `single_student_pass=False` does
that too (the student's BN running statistics are then updated twice per iteration).
"""
import functools
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dfqf_jax import checkpoints, data, images, parallel, rng, training, validation
from dfqf_jax import losses as L
from dfqf_jax.models.generator import Generator, sample_latent
from dfqf_jax.models.layers import BN_INPUT_STATS
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import common

STAGE_DIR = "generator"
LOSS_KEYS = ("loss_g", "loss_is", "loss_bn", "loss_adv")


class Models(NamedTuple):
  """The modules of a stage-1 iteration (in the step's compute dtype)."""
  generator: Generator
  teacher: CifarResNet
  student: CifarResNet


@struct.dataclass
class Hyper:
  """Static settings of one stage-1 iteration."""
  batch_size: int = struct.field(pytree_node=False)
  latent_dim: int = struct.field(pytree_node=False)
  lambda_is: float = struct.field(pytree_node=False)
  lambda_bn: float = struct.field(pytree_node=False)
  lambda_adv: float = struct.field(pytree_node=False)
  single_student_pass: bool = struct.field(pytree_node=False, default=True)
  # The student's BNs: batch statistics, running statistics updated (stage 1, the reference);
  # False: the running statistics, frozen (fine-tuning's student_bn_train=False).
  student_bn_train: bool = struct.field(pytree_node=False, default=True)


def student_forward(student: CifarResNet, params, batch_stats, x, bn_train: bool):
  """(logits, the student's next batch_stats): BNs in training mode with bn_train, else
  normalizing with the running statistics, which stay as they are."""
  variables = {"params": params, "batch_stats": batch_stats}
  if bn_train:
    s, updates = student.apply(variables, x, train=True, mutable=["batch_stats"])
    return s, updates["batch_stats"]
  return student.apply(variables, x, train=False), batch_stats


class GeneratorState(struct.PyTreeNode):
  """Generator and FP student with their optimizer states; the modules, optimizers and
  settings ride along as static fields (as in flax's TrainState), so the iteration is
  step(state, key, teacher_vars)."""
  step: jax.Array
  generator: dict  # {'params', 'batch_stats'}
  g_opt_state: optax.OptState
  student: dict
  s_opt_state: optax.OptState
  models: Models = struct.field(pytree_node=False)
  g_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  s_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  hp: Hyper = struct.field(pytree_node=False)


def make_generator(config) -> Generator:
  return Generator(config.generator.latent_dim, reference_quirks=config.generator.reference_quirks)


def generator_optimizer(config):
  return optax.adam(config.generator.learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def student_optimizer(config, total_steps: int):
  schedule = training.step_decay(config.student.learning_rate,
                                 [f * total_steps for f in config.student.lr_milestones], 1)
  return training.sgd(schedule, config.student.momentum, config.student.weight_decay), schedule


def initial_state(models: Models, g_tx, s_tx, hp: Hyper, key) -> GeneratorState:
  """A fresh generator and student (the student initialized from scratch, as the reference)."""
  g_key, s_key = jax.random.split(key)
  g_vars = models.generator.init(g_key, jnp.zeros((2, hp.latent_dim)))
  s_vars = models.student.init(s_key, jnp.zeros((1, 32, 32, 3)))
  g = {"params": g_vars["params"], "batch_stats": g_vars["batch_stats"]}
  s = {"params": s_vars["params"], "batch_stats": s_vars["batch_stats"]}
  return GeneratorState(jnp.zeros((), jnp.int32), g, g_tx.init(g["params"]), s,
                        s_tx.init(s["params"]), models, g_tx, s_tx, hp)


def train_step(state: GeneratorState, key, teacher_vars, mesh=None):
  """One DFQF stage-1 iteration on a global batch (see the module docstring).

  Also runs on any state with GeneratorState's fields (fine-tuning's adversarial option)."""
  generator, teacher, student = state.models
  hp = state.hp
  z = sample_latent(key, hp.batch_size, hp.latent_dim)
  if mesh is not None:
    z = jax.lax.with_sharding_constraint(z, parallel.batch_sharding(mesh))

  def generator_loss(g_params, s_params):
    x, g_updates = generator.apply(
        {"params": g_params, "batch_stats": state.generator["batch_stats"]}, z, train=True,
        mutable=["batch_stats"])
    t, recorded = teacher.apply(teacher_vars, x, train=False, mutable=[BN_INPUT_STATS])
    s, s_stats = student_forward(student, s_params, state.student["batch_stats"], x,
                                 hp.student_bn_train)
    loss_is, h_cond, h_marg = L.inception_score_loss(t, hp.lambda_is)
    loss_bn = L.bn_statistics_loss(recorded[BN_INPUT_STATS], teacher_vars["batch_stats"])
    loss_adv = L.kd_loss(t, s)
    loss = loss_is + hp.lambda_bn * loss_bn - hp.lambda_adv * loss_adv
    aux = (x, t, g_updates["batch_stats"], s_stats,
           {"loss_g": loss, "loss_is": loss_is, "entropy_conditional": h_cond,
            "entropy_marginal": h_marg, "loss_bn": loss_bn, "loss_adv": loss_adv})
    return loss, aux

  (_, (x, t, g_stats, s_stats, metrics)), (g_grads, s_adv_grads) = jax.value_and_grad(
      generator_loss, argnums=(0, 1), has_aux=True)(
          state.generator["params"], state.student["params"])

  if hp.single_student_pass:
    s_grads = jax.tree.map(lambda g: -g / hp.lambda_adv, s_adv_grads)
  else:
    x, t = jax.lax.stop_gradient(x), jax.lax.stop_gradient(t)

    def student_loss(s_params):
      s, stats = student_forward(student, s_params, s_stats, x, hp.student_bn_train)
      return L.kd_loss(t, s), stats

    (_, s_stats), s_grads = jax.value_and_grad(student_loss, has_aux=True)(
        state.student["params"])

  g_updates, g_opt_state = state.g_tx.update(g_grads, state.g_opt_state,
                                             state.generator["params"])
  s_updates, s_opt_state = state.s_tx.update(s_grads, state.s_opt_state,
                                             state.student["params"])
  new_state = state.replace(
      step=state.step + 1,
      generator={"params": optax.apply_updates(state.generator["params"], g_updates),
                 "batch_stats": g_stats},
      g_opt_state=g_opt_state,
      student={"params": optax.apply_updates(state.student["params"], s_updates),
               "batch_stats": s_stats},
      s_opt_state=s_opt_state)
  probs = jax.nn.softmax(t)
  histogram = jnp.bincount(jnp.argmax(t, -1), length=t.shape[-1]) / t.shape[0]
  metrics.update(teacher_max_prob=probs.max(-1).mean(),
                 class_histogram_entropy=L.entropy(histogram))
  return new_state, metrics


def total_steps_of(config) -> int:
  return config.num_epochs * config.iters_per_epoch


def create_state_and_step(config, teacher: CifarResNet, mesh):
  """(initial state replicated on `mesh`, jitted step(state, key, teacher_vars)).

  The modules compute in config.compute_dtype; the step logs the student's learning rate."""
  dtype = common.compute_dtype(config)
  models = Models(make_generator(config).clone(dtype=dtype), teacher.clone(dtype=dtype),
                  CifarResNet(teacher.depth, teacher.num_classes, dtype=dtype))
  g_tx = generator_optimizer(config)
  s_tx, s_schedule = student_optimizer(config, total_steps_of(config))
  hp = Hyper(config.batch_size, config.generator.latent_dim, config.lambda_is,
             config.lambda_bn, config.lambda_adv, config.single_student_pass)
  state = jax.jit(lambda key: initial_state(models, g_tx, s_tx, hp, key),
                  out_shardings=parallel.replicated(mesh))(rng.key(config.seed, rng.INIT))
  step = functools.partial(train_step, mesh=mesh)
  return state, training.jit_step(step, s_schedule, "student_learning_rate")


def stage_meta(config, teacher_meta) -> dict:
  student = common.classifier_meta(teacher_meta["depth"], teacher_meta["dataset"],
                                   teacher_meta["mean"], teacher_meta["std"],
                                   path=["student"])
  return {"arch": "dafl_generator", "latent_dim": config.generator.latent_dim,
          "reference_quirks": config.generator.reference_quirks,
          # fine-tuning's adversarial generator keeps training with these by default
          "loss_weights": {field: validation.field_value(config, source)
                           for field, source in validation.ADVERSARIAL_FIELDS.items()},
          "teacher": {k: teacher_meta[k] for k in ("depth", "dataset", "mean", "std")},
          "classifiers": {"generator_student_fp": student}}


def load_generator(workdir: str, generator_dir: str = ""):
  """(Generator module, variables, meta) of the last stage-1 checkpoint."""
  directory = generator_dir or os.path.join(workdir, STAGE_DIR)
  state, meta, _ = checkpoints.load_product(directory, "generator")
  module = Generator(meta["latent_dim"], reference_quirks=meta["reference_quirks"])
  return module, state["generator"], meta


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 6))
def _generate_and_classify(generator, g_vars, teacher, teacher_vars, key, count, latent_dim):
  """`count` generated images (batch statistics, as in training) and the teacher's classes."""
  x = generator.apply(g_vars, sample_latent(key, count, latent_dim), train=True,
                      mutable=["batch_stats"])[0]
  return x, jnp.argmax(teacher.apply(teacher_vars, x, train=False), -1)


def save_grid(path, generator, g_vars, teacher, teacher_vars, latent_dim, teacher_meta, key,
              count: int):
  x, predicted = _generate_and_classify(generator, g_vars, teacher, teacher_vars, key, count,
                                        latent_dim)
  predicted = np.asarray(predicted)
  pictures = images.denormalize(x, teacher_meta["mean"], teacher_meta["std"])
  images.save_png(path, images.class_grid(pictures, predicted, teacher_meta["num_classes"]),
                  labels=images.row_labels(predicted, data.class_names(teacher_meta["dataset"])))


def held_out_training_images(config, dataset: str):
  """The data.validation_size held-out training images, or None when it is 0.

  Stage 1 trains on no real data; these images only measure the FP student, so that
  settings can be compared without looking at the test split.
  """
  if config.data.validation_size <= 0:
    return None
  train = data.load_split(dataset, "train", data.source(config.data))
  return data.train_validation_split(train, config.data.validation_size, config.seed)[1]


def run(config, workdir: str) -> None:
  stage_dir = os.path.join(workdir, STAGE_DIR)
  teacher, teacher_vars, teacher_meta = common.load_teacher(workdir, config.teacher_dir)
  common.check_teacher_depth(config, teacher_meta)
  mesh = parallel.make_mesh()
  test_split = data.load_split(teacher_meta["dataset"], "test", data.source(config.data))
  val_split = held_out_training_images(config, teacher_meta["dataset"])

  total_steps = total_steps_of(config)
  lineage = {"teacher": teacher_meta[checkpoints.ORIGIN]}
  meta = {**stage_meta(config, teacher_meta), "total_steps": total_steps, "lineage": lineage}
  checkpoints.check_lineage(stage_dir, "generator", lineage, config.on_stale_upstream)
  print("generator: initializing the generator and the student (compiling)", file=sys.stderr,
        flush=True)
  state, step_fn = create_state_and_step(config, teacher, mesh)
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = training.resume(ckpt, stage_dir, state, meta, "generator")

  teacher_vars = parallel.replicate(mesh, teacher_vars)
  base_key = rng.key(config.seed, rng.STAGE1_LATENTS)

  def do_step(state, step):
    return step_fn(state, rng.step_key(base_key, step), teacher_vars)

  generator = make_generator(config)  # evaluation and grids in float32
  student_top1 = common.top1_evaluator(
      CifarResNet(teacher_meta["depth"], teacher_meta["num_classes"]),
      lambda state: common.variables_of(state.student), {"test": test_split, "val": val_split},
      teacher_meta["mean"], teacher_meta["std"], mesh, config.iters_per_epoch, "student_")

  def evaluate(state, step):
    if training.is_main_process():
      save_grid(os.path.join(stage_dir, "grid.png"), generator, state.generator, teacher,
                teacher_vars, config.generator.latent_dim, teacher_meta,
                rng.key(config.seed, rng.GRID_LATENTS), config.grid_images)
    return student_top1(state, step)

  training.run_steps(name="generator", ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=do_step, meta=meta,
                     log_every=config.log_every_steps, loss_keys=LOSS_KEYS,
                     evaluate=evaluate,
                     eval_every=config.eval_every_epochs * config.iters_per_epoch)
