"""GDFQ's image source: a label-conditioned generator (models.conditional_generator).

Per iteration: labels y ~ U{0..classes-1}, z ~ N(0, I), x = G(z | y) (G's BNs in training
mode), t = T(x) (inference mode, its BN inputs recorded); G descends
CE(t, y) + lambda_bns L_BNS (baselines.gdfq_generator_loss; Adam). This stage is GDFQ's
warm-up: `warmup_steps` of these iterations with no student. Fine-tuning with images='gdfq'
(`finetune_source`) goes on with them, G's optimizer state continued, and after each one the
quantized student descends GDFQ's alpha T^2 KL + CE on the same (detached) x, t and y, as
GDFQ's trainer does. The warm-up keeps the generator's initial lr (in GDFQ it is 1% of the
run and ends long before the first lr drop); in fine-tuning it drops x0.1 at lr_milestones of
the fine-tuning steps (lr_milestones_of='finetuning') or of the whole run ('whole_run').
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dfqf_jax import (baselines, checkpoints, classifiers, dfkd, image_sources, images,
                      parallel, rng, training)
from dfqf_jax.models.conditional_generator import ConditionalGenerator
from dfqf_jax.models.generator import REFERENCE_WIDTH, sample_latent

STAGE_DIR = image_sources.SOURCES["gdfq"].stage_dir
SETTINGS = ("learning_rate", "b1", "b2", "lr_milestones", "lr_milestones_of", "lambda_bns",
            "temperature", "alpha", "kd_reduction")
MILESTONES_OF = ("finetuning", "whole_run")
# What a warm-up checkpoint written before lr_milestones_of existed was fine-tuned with.
MILESTONES_OF_WHEN_UNRECORDED = "whole_run"


@struct.dataclass
class Hyper:
  batch_size: int = struct.field(pytree_node=False)
  latent_dim: int = struct.field(pytree_node=False)
  num_classes: int = struct.field(pytree_node=False)
  lambda_bns: float = struct.field(pytree_node=False)
  temperature: float = struct.field(pytree_node=False)
  alpha: float = struct.field(pytree_node=False)
  kd_reduction: str = struct.field(pytree_node=False)
  student_bn_train: bool = struct.field(pytree_node=False, default=False)


class WarmupState(struct.PyTreeNode):
  step: jax.Array
  generator: dict  # {'params', 'batch_stats'}
  g_opt_state: optax.OptState
  models: dfkd.Models = struct.field(pytree_node=False)  # (generator, teacher, None)
  g_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  hp: Hyper = struct.field(pytree_node=False)


def generator_milestones(settings: dict, warmup_steps: int, finetune_steps: int) -> list:
  """The optimizer steps (counted from the warm-up's first) at which G's lr drops x0.1."""
  of = settings.get("lr_milestones_of", MILESTONES_OF_WHEN_UNRECORDED)
  start, span = ((warmup_steps, finetune_steps) if of == "finetuning" else
                 (0, warmup_steps + finetune_steps))
  return [start + f * span for f in settings["lr_milestones"]]


def generator_optimizer(settings: dict, milestones: list | None = None):
  """GDFQ's Adam for G: lr constant (milestones None, the warm-up), else x0.1 at each
  milestone step of the optimizer's own step count."""
  lr = settings["learning_rate"]
  schedule = (optax.constant_schedule(lr) if milestones is None else
              training.step_decay(lr, milestones, 1))
  return optax.adam(schedule, b1=settings["b1"], b2=settings["b2"]), schedule


def hyper(config, num_classes: int, batch_size: int, student_bn_train: bool = False) -> Hyper:
  """config: this stage's config, or the settings its checkpoint recorded."""
  return Hyper(batch_size, config["latent_dim"], num_classes, config["lambda_bns"],
               config["temperature"], config["alpha"], config["kd_reduction"],
               student_bn_train)


def sample_labels_and_latents(key, hp: Hyper, mesh=None):
  z_key, y_key = jax.random.split(key)
  z = sample_latent(z_key, hp.batch_size, hp.latent_dim)
  labels = jax.random.randint(y_key, (hp.batch_size,), 0, hp.num_classes)
  if mesh is not None:
    z = jax.lax.with_sharding_constraint(z, parallel.batch_sharding(mesh))
    labels = jax.lax.with_sharding_constraint(labels, parallel.batch_sharding(mesh))
  return z, labels


def generator_update(state, key, teacher_vars, mesh=None):
  """GDFQ's generator iteration on any state with WarmupState's fields. Returns (G's
  variables, its optimizer state, (x, t, y) before the update, metrics)."""
  hp, generator, teacher = state.hp, state.models.generator, state.models.teacher
  z, labels = sample_labels_and_latents(key, hp, mesh)

  def loss_fn(params):
    x, updates = generator.apply({"params": params, "batch_stats": state.generator["batch_stats"]},
                                 z, labels, train=True, mutable=["batch_stats"])
    t, layers = baselines.teacher_bn_inputs(teacher, teacher_vars, x)
    loss, ce, bns = baselines.gdfq_generator_loss(t, labels, layers, hp.lambda_bns)
    return loss, (x, t, updates["batch_stats"], {"loss_g": loss, "loss_g_ce": ce,
                                                 "loss_bns": bns})

  (_, (x, t, stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.generator["params"])
  updates, g_opt_state = state.g_tx.update(grads, state.g_opt_state, state.generator["params"])
  variables = {"params": optax.apply_updates(state.generator["params"], updates),
               "batch_stats": stats}
  metrics["teacher_label_agreement"] = (jnp.argmax(t, -1) == labels).mean()
  return variables, g_opt_state, (x, t, labels), metrics


def initial_generator(generator: ConditionalGenerator, key) -> dict:
  variables = generator.init(key, jnp.zeros((2, generator.latent_dim)),
                             jnp.zeros((2,), jnp.int32))
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def warmup_step(state: WarmupState, key, teacher_vars, mesh=None):
  variables, g_opt_state, _, metrics = generator_update(state, key, teacher_vars, mesh)
  return state.replace(step=state.step + 1, generator=variables, g_opt_state=g_opt_state), metrics


def finetune_step(state, key, teacher_vars, mesh=None):
  """One GDFQ iteration of fine-tuning (a finetune.FinetuneState): G's update, then the
  student's on the images, teacher logits and labels drawn before it."""
  variables, g_opt_state, (x, t, labels), metrics = generator_update(state, key, teacher_vars,
                                                                     mesh)
  x, t = jax.lax.stop_gradient(x), jax.lax.stop_gradient(t)
  hp, student = state.hp, state.models.student

  def loss_fn(params):
    s, stats = dfkd.student_forward(student, params, state.student["batch_stats"], x,
                                    hp.student_bn_train)
    loss, kd, ce = baselines.gdfq_student_loss(s, t, labels, hp.temperature, hp.alpha,
                                               hp.kd_reduction)
    return loss, (s, stats, {"loss_s": loss, "loss_kd": kd, "loss_ce": ce})

  (_, (s, s_stats, s_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.student["params"])
  updates, s_opt_state = state.s_tx.update(grads, state.s_opt_state, state.student["params"])
  student_vars = {"params": optax.apply_updates(state.student["params"], updates),
                  "batch_stats": s_stats}
  metrics.update(s_metrics, teacher_agreement=(jnp.argmax(s, -1) == jnp.argmax(t, -1)).mean())
  return state.replace(step=state.step + 1, generator=variables, g_opt_state=g_opt_state,
                       student=student_vars, s_opt_state=s_opt_state), metrics


def stage_meta(config, teacher_meta) -> dict:
  return {"arch": "gdfq_generator", "latent_dim": config.latent_dim,
          "num_classes": teacher_meta["num_classes"],
          "reference_quirks": config.reference_quirks, "width": config.width,
          "settings": {k: config[k] for k in SETTINGS},
          "teacher": classifiers.teacher_identity(teacher_meta)}


def _module(meta_or_config, num_classes: int) -> ConditionalGenerator:
  return ConditionalGenerator(num_classes, meta_or_config["latent_dim"],
                              meta_or_config["reference_quirks"],
                              width=meta_or_config.get("width", REFERENCE_WIDTH))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generate(generator, g_vars, key, count: int):
  """`count` images G(z | y) (batch statistics, as in training) and their labels y."""
  z_key, y_key = jax.random.split(key)
  labels = jax.random.randint(y_key, (count,), 0, generator.num_classes)
  x = generator.apply(g_vars, sample_latent(z_key, count, generator.latent_dim), labels,
                      train=True, mutable=["batch_stats"])[0]
  return x, labels


def run(config, workdir: str) -> None:
  stage_dir = os.path.join(workdir, STAGE_DIR)
  teacher, teacher_vars, teacher_meta = classifiers.load_stage_teacher(config, workdir)
  mesh = parallel.make_mesh()
  lineage = {"teacher": teacher_meta[checkpoints.ORIGIN]}
  meta = {**stage_meta(config, teacher_meta), "total_steps": config.warmup_steps,
          "lineage": lineage, "seed": config.seed}
  checkpoints.check_lineage(stage_dir, STAGE_DIR, lineage, config.on_stale_upstream)
  dtype = training.compute_dtype(config)
  num_classes = teacher_meta["num_classes"]
  generator = _module(config, num_classes)
  models = dfkd.Models(generator.clone(dtype=dtype), teacher.clone(dtype=dtype), None)
  g_tx, schedule = generator_optimizer(config)
  hp = hyper(config, num_classes, config.batch_size)

  def init(key):
    g_vars = initial_generator(generator, key)
    return WarmupState(jnp.zeros((), jnp.int32), g_vars, g_tx.init(g_vars["params"]), models,
                       g_tx, hp)

  state = jax.jit(init, out_shardings=parallel.replicated(mesh))(rng.key(config.seed, rng.INIT))
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = training.resume(ckpt, stage_dir, state, meta, STAGE_DIR)
  step_fn = training.jit_step(functools.partial(warmup_step, mesh=mesh), schedule,
                              "generator_learning_rate")
  teacher_vars = parallel.replicate(mesh, teacher_vars)
  base_key = rng.key(config.seed, rng.STAGE1_LATENTS)

  def save_grid(state, step):
    if training.is_main_process():
      x, labels = _generate(generator, state.generator, rng.key(config.seed, rng.GRID_LATENTS),
                            10 * num_classes)
      images.save_class_grid(os.path.join(stage_dir, images.GRID_FILE), x, labels, teacher_meta)
    return {}

  training.run_steps(name=STAGE_DIR, ckpt=ckpt, state=state, start_step=start,
                     total_steps=config.warmup_steps,
                     train_step=lambda s, step: step_fn(s, rng.step_key(base_key, step),
                                                        teacher_vars),
                     meta=meta, log_every=config.log_every_steps, loss_keys=("loss_g",),
                     evaluate=save_grid, eval_every=config.warmup_steps)


def _continued(fresh, saved):
  """`saved` (a checkpoint's optimizer state, read back as plain containers) in the
  structure of `fresh`, the same optimizer's initial state."""
  leaves, fresh_leaves = jax.tree.leaves(saved), jax.tree.leaves(fresh)
  if [np.shape(a) for a in leaves] != [np.shape(b) for b in fresh_leaves]:
    raise checkpoints.CheckpointError("the GDFQ generator checkpoint's optimizer state does not "
                                      "fit GDFQ's Adam; rerun the gdfq stage.")
  return jax.tree.unflatten(jax.tree.structure(fresh), leaves)


def finetune_source(config, workdir: str, mesh) -> image_sources.ImageSource:
  """GDFQ's generator, warmed up in DIR/gdfq_generator, for a fine-tuning config."""
  state, meta, _ = checkpoints.load_product(os.path.join(workdir, STAGE_DIR), STAGE_DIR)
  if state["step"] != meta["total_steps"]:
    raise checkpoints.CheckpointError(
        f"the GDFQ warm-up in {os.path.join(workdir, STAGE_DIR)!r} stopped at step "
        f"{state['step']} of {meta['total_steps']}; rerun the gdfq stage to finish it.")
  settings = meta["settings"]
  milestones = generator_milestones(settings, meta["total_steps"],
                                    config.num_epochs * config.steps_per_epoch)
  if meta["total_steps"] > min(milestones, default=np.inf):
    print(f"warning: GDFQ's warm-up ({meta['total_steps']} steps) ran past its generator's "
          f"first lr drop (step {min(milestones):g} of its whole run) at the initial lr; "
          "fine-tuning continues with the decayed lr.", file=sys.stderr)
  module = _module(meta, meta["num_classes"])
  g_tx, _ = generator_optimizer(settings, milestones)
  g_vars = {"params": state["generator"]["params"],
            "batch_stats": state["generator"]["batch_stats"]}
  g_opt_state = _continued(g_tx.init(g_vars["params"]), state["g_opt_state"])
  hp = hyper({**meta, **settings}, meta["num_classes"], config.batch_size,
             config.student_bn_train)

  def calibration_batches(config, key):
    return [_generate(module, g_vars, jax.random.fold_in(key, i), config.calibration_batch_size)[0]
            for i in range(config.calibration_batches)]

  return image_sources.ImageSource(
      lineage={STAGE_DIR: meta[checkpoints.ORIGIN]}, calibration_batches=calibration_batches,
      generator=(module, g_vars, g_opt_state, g_tx), hyper=hp,
      step=functools.partial(finetune_step, mesh=mesh),
      inputs=lambda step, base_key: rng.step_key(base_key, step))
