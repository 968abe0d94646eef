"""Stage 1: train the DAFL generator against the frozen teacher (DFQF's DFKD warm-up), with
a full-precision student trained alongside, by `dfqf_jax.dfkd`'s iteration. The product is
the last generator."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dfqf_jax import (checkpoints, classifiers, config_fields, data, dfkd, image_sources, images,
                      parallel, rng, training, validation)
from dfqf_jax.models.generator import Generator
from dfqf_jax.models.resnet import CifarResNet

STAGE_DIR = image_sources.GENERATOR_DIR
LOSS_KEYS = ("loss_g", "loss_is", "loss_bn", "loss_adv")


class GeneratorState(struct.PyTreeNode):
  """Generator and FP student with their optimizer states; the modules, optimizers and
  settings ride along as static fields (as in flax's TrainState), so the iteration is
  step(state, key, teacher_vars)."""
  step: jax.Array
  generator: dict  # {'params', 'batch_stats'}
  g_opt_state: optax.OptState
  student: dict
  s_opt_state: optax.OptState
  models: dfkd.Models = struct.field(pytree_node=False)
  g_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  s_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  hp: dfkd.Hyper = struct.field(pytree_node=False)


def make_generator(config) -> Generator:
  return Generator(config.generator.latent_dim, reference_quirks=config.generator.reference_quirks,
                   width=config.generator.width)


def generator_optimizer(config):
  return optax.adam(config.generator.learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def student_optimizer(config, total_steps: int):
  schedule = training.step_decay(config.student.learning_rate,
                                 [f * total_steps for f in config.student.lr_milestones], 1)
  return training.sgd(schedule, config.student.momentum, config.student.weight_decay), schedule


def initial_state(models: dfkd.Models, g_tx, s_tx, hp: dfkd.Hyper, key) -> GeneratorState:
  """A fresh generator and student (the student initialized from scratch, as the reference)."""
  g_key, s_key = jax.random.split(key)
  g_vars = models.generator.init(g_key, jnp.zeros((2, hp.latent_dim)))
  s_vars = models.student.init(s_key, jnp.zeros((1, 32, 32, 3)))
  g = {"params": g_vars["params"], "batch_stats": g_vars["batch_stats"]}
  s = {"params": s_vars["params"], "batch_stats": s_vars["batch_stats"]}
  return GeneratorState(jnp.zeros((), jnp.int32), g, g_tx.init(g["params"]), s,
                        s_tx.init(s["params"]), models, g_tx, s_tx, hp)


def total_steps_of(config) -> int:
  return config.num_epochs * config.iters_per_epoch


def create_state_and_step(config, teacher: CifarResNet, mesh):
  """(initial state replicated on `mesh`, jitted step(state, key, teacher_vars)).

  The modules compute in config.compute_dtype; the step logs the student's learning rate."""
  dtype = training.compute_dtype(config)
  models = dfkd.Models(make_generator(config).clone(dtype=dtype), teacher.clone(dtype=dtype),
                       CifarResNet(teacher.depth, teacher.num_classes, dtype=dtype))
  g_tx = generator_optimizer(config)
  s_tx, s_schedule = student_optimizer(config, total_steps_of(config))
  hp = dfkd.Hyper(config.batch_size, config.generator.latent_dim, config.lambda_is,
                  config.lambda_bn, config.lambda_adv, config.single_student_pass)
  state = jax.jit(lambda key: initial_state(models, g_tx, s_tx, hp, key),
                  out_shardings=parallel.replicated(mesh))(rng.key(config.seed, rng.INIT))
  step = functools.partial(dfkd.train_step, mesh=mesh)
  return state, training.jit_step(step, s_schedule, "student_learning_rate")


def stage_meta(config, teacher_meta) -> dict:
  student = classifiers.classifier_meta(teacher_meta["depth"], teacher_meta["dataset"],
                                        teacher_meta["mean"], teacher_meta["std"],
                                        path=["student"])
  return {"arch": "dafl_generator", "latent_dim": config.generator.latent_dim,
          "reference_quirks": config.generator.reference_quirks, "width": config.generator.width,
          # fine-tuning's adversarial generator keeps training with these by default
          "loss_weights": {field: validation.field_value(config, source)
                           for field, source in config_fields.ADVERSARIAL_FIELDS.items()},
          "teacher": classifiers.teacher_identity(teacher_meta),
          "classifiers": {"generator_student_fp": student}}


@functools.partial(jax.jit, static_argnums=(0, 2, 5))
def _generate_and_classify(generator, g_vars, teacher, teacher_vars, key, count):
  """`count` generated images (batch statistics, as in training) and the teacher's classes."""
  x = image_sources.generate(generator, g_vars, key, count)
  return x, jnp.argmax(teacher.apply(teacher_vars, x, train=False), -1)


def save_grid(path, generator, teacher, teacher_meta, key, count: int):
  """A PNG of `count` images of `generator` = (module, variables), one row per class that
  `teacher` = (module, variables) gives them."""
  images.save_class_grid(path, *_generate_and_classify(*generator, *teacher, key, count),
                         teacher_meta)


def held_out_training_images(config, dataset: str):
  """The data.validation_size held-out training images, or None when it is 0.

  Stage 1 trains on no real data; these images only measure the FP student, so that
  settings can be compared without looking at the test split.
  """
  if config.data.validation_size <= 0:
    return None
  return data.training_splits(config.data, dataset, config.seed)[1]


def run(config, workdir: str) -> None:
  stage_dir = os.path.join(workdir, STAGE_DIR)
  teacher, teacher_vars, teacher_meta = classifiers.load_stage_teacher(config, workdir)
  mesh = parallel.make_mesh()
  test_split = data.load_split(teacher_meta["dataset"], "test", data.source(config.data))
  val_split = held_out_training_images(config, teacher_meta["dataset"])

  total_steps = total_steps_of(config)
  lineage = {"teacher": teacher_meta[checkpoints.ORIGIN]}
  meta = {**stage_meta(config, teacher_meta), "total_steps": total_steps, "lineage": lineage,
          "seed": config.seed}
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
  student_top1 = classifiers.top1_evaluator(
      CifarResNet(teacher_meta["depth"], teacher_meta["num_classes"]),
      lambda state: classifiers.variables_of(state.student),
      {"test": test_split, "val": val_split},
      teacher_meta["mean"], teacher_meta["std"], mesh, config.iters_per_epoch, "student_")

  def evaluate(state, step):
    if training.is_main_process():
      save_grid(os.path.join(stage_dir, images.GRID_FILE), (generator, state.generator),
                (teacher, teacher_vars), teacher_meta, rng.key(config.seed, rng.GRID_LATENTS),
                config.grid_images)
    return student_top1(state, step)

  training.run_steps(name="generator", ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=do_step, meta=meta,
                     log_every=config.log_every_steps, loss_keys=LOSS_KEYS,
                     evaluate=evaluate,
                     eval_every=config.eval_every_epochs * config.iters_per_epoch)
