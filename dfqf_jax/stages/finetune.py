"""Stage 2: calibrate the quantized student, then fine-tune it by KD on generated images.

Each step draws fresh images x = G(z) (G's BNs in training mode), and the quantized student
S_q descends KL(softmax(T(x)) || softmax(S_q(x))) with T in inference mode. S_q's BNs are in
training mode, so their running statistics adapt to generated data (the reference;
`student_bn_train=False` keeps the teacher's statistics frozen). Weights use SGD (momentum
0.9, weight decay 5e-4, lr 0.001); clip values plain SGD at lr 0.0001.

Options: `adversarial_generator=True` keeps updating G with the stage-1 generator loss
against S_q (`dfqf_jax.dfkd`'s iteration, as stage 1), with the loss weights and learning rate G was
trained with unless the config sets them; `data_source='real'` replaces generated images with
augmented real training images (the real-data QAT bound, labels unused).
"""
import functools
import os

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dfqf_jax import (calibration, checkpoints, classifiers, data, dfkd, image_sources, parallel,
                      rng, training, validation)
from dfqf_jax import losses as L
from dfqf_jax import quant as q
from dfqf_jax.models.resnet import CifarResNet, activation_layer
from dfqf_jax.config_fields import ADVERSARIAL_FIELDS
from dfqf_jax.validation import ConfigError


def with_generator_loss_weights(config, g_meta: dict):
  """The config with the adversarial generator's loss weights and learning rate: those it
  sets, else those the generator was trained with (its checkpoint's `loss_weights`)."""
  trained = g_meta.get("loss_weights", {})
  missing = [f for f in ADVERSARIAL_FIELDS if config[f] is None and f not in trained]
  if missing:
    raise ConfigError(
        f"the generator's checkpoint does not record {', '.join(missing)} (it was trained "
        "before they were recorded), and adversarial_generator trains it further with them: "
        "pass the values it was trained with, e.g. --config.lambda_is=40.0 "
        "--config.lambda_bn=10.0 --config.lambda_adv=5.0 --config.generator_learning_rate=0.005 "
        "for configs/generator.py:cpu.")
  config = config.copy_and_resolve_references()
  for field in ADVERSARIAL_FIELDS:
    if config[field] is None:
      config[field] = trained[field]
  return config


def stage_name(config, spec: q.QuantSpec) -> str:
  name = "qat_real" if config.data_source == "real" else "student"
  name += f"_{spec.bits_name()}{spec.name_suffix()}"
  return name if config.images == "dfqf" else f"{name}_{config.images}"


def clip_kind(spec: q.QuantSpec, param_path) -> str | None:
  """The clip kind (q.LEARNED or q.FIXED) of a parameter that is a clip, from its layer's
  rule; None for any other parameter."""
  if not q.is_clip(param_path):
    return None
  layer = param_path[:-1]
  return spec.rule_of(layer if param_path[-1] == q.WEIGHT_CLIP else activation_layer(layer)).clip


def student_optimizer(config, steps_per_epoch: int, spec: q.QuantSpec):
  """SGD with momentum (Nesterov's with config.nesterov) and weight decay for weights; plain
  SGD for the clip values whose rule says learned; the fixed ones keep their calibrated
  values."""
  schedule = training.step_decay(config.learning_rate, config.lr_milestones, steps_per_epoch)
  groups = {None: "weight", q.LEARNED: "clip", q.FIXED: "fixed_clip"}
  label = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: groups[clip_kind(spec, tuple(k.key for k in path))], params)
  transforms = {"weight": training.sgd(schedule, config.momentum, config.weight_decay,
                                       config.nesterov),
                "clip": optax.sgd(config.clip_learning_rate)}
  if any(rule.clip == q.FIXED for rule in spec.rules):
    transforms["fixed_clip"] = optax.set_to_zero()
  return optax.multi_transform(transforms, label), schedule


class FinetuneState(struct.PyTreeNode):
  """The quantized student (`student`, `s_opt_state`) and the generator that feeds it; the
  modules, optimizers and settings ride along as static fields.

  The generator is trained only with `adversarial_generator` or by an image source that
  trains one alongside (otherwise g_tx is None, g_opt_state is empty and the generator's
  variables never change); the adversarial option runs `dfkd.train_step` on this state,
  hence its fields. The student's BN mode (config.student_bn_train) is hp.student_bn_train,
  which every step honours."""
  step: jax.Array
  generator: dict  # {'params', 'batch_stats'}; empty when fine-tuning on real images
  g_opt_state: optax.OptState
  student: dict
  s_opt_state: optax.OptState
  models: dfkd.Models = struct.field(pytree_node=False)
  g_tx: optax.GradientTransformation | None = struct.field(pytree_node=False)
  s_tx: optax.GradientTransformation = struct.field(pytree_node=False)
  hp: object = struct.field(pytree_node=False)  # dfkd.Hyper, or an image source's settings


def generate(state: FinetuneState, key, mesh):
  """A fresh global batch x = G(z), G's BNs in training mode (as stage 1 trained it)."""
  return image_sources.generate(state.models.generator, state.generator, key,
                                state.hp.batch_size, mesh)


def kd_step(state: FinetuneState, x, teacher_vars):
  """One KD step of the student on images x.

  hp.student_bn_train: the student's BNs normalize with batch statistics and update their
  running statistics (the reference); False keeps the teacher's running statistics frozen.
  """
  _, teacher, student = state.models
  t = teacher.apply(teacher_vars, x, train=False)

  def loss_fn(params):
    s, stats = dfkd.student_forward(student, params, state.student["batch_stats"], x,
                                    state.hp.student_bn_train)
    return L.kd_loss(t, s), (s, stats)

  (loss, (s, s_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.student["params"])
  updates, s_opt_state = state.s_tx.update(grads, state.s_opt_state, state.student["params"])
  student_state = {"params": optax.apply_updates(state.student["params"], updates),
                   "batch_stats": s_stats}
  agreement = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).mean()
  return state.replace(step=state.step + 1, student=student_state, s_opt_state=s_opt_state), {
      "loss_kd": loss, "teacher_agreement": agreement}


def create_state_and_step(config, teacher: CifarResNet, generator, student, mesh,
                          normalization=(data.CIFAR_MEAN, data.CIFAR_STD), source=None):
  """(initial state replicated on `mesh`, jitted step(state, inputs, teacher_vars)).

  generator: (module, variables) of stage 1, or None when fine-tuning on real images.
  student: (quantized module, calibrated variables).
  inputs: a PRNG key (generated images; with `adversarial_generator`, a stage-1 iteration
  against the quantized student) or, with data_source='real', a global uint8 image batch
  (normalized inside the step with the teacher's `normalization`, its (mean, std)).
  source: an image_sources.ImageSource (config.images other than 'dfqf'), which supplies the
  generator trained alongside (if any), the step's settings and the step (if not KD).
  The modules compute in config.compute_dtype; the step logs the learning rate.
  """
  dtype = training.compute_dtype(config)
  (g_model, g_vars), (s_model, s_vars) = generator or (None, {}), student
  models = dfkd.Models(None if g_model is None else g_model.clone(dtype=dtype),
                       teacher.clone(dtype=dtype),
                       s_model.clone(dtype=dtype))
  s_tx, schedule = student_optimizer(config, config.steps_per_epoch, s_model.quant)
  g_tx = optax.adam(config.generator_learning_rate) if config.adversarial_generator else None
  hp = dfkd.Hyper(config.batch_size, 0 if g_model is None else g_model.latent_dim,
                  config.lambda_is, config.lambda_bn, config.lambda_adv,
                  student_bn_train=config.student_bn_train)
  g_opt_state = g_tx.init(g_vars["params"]) if g_tx else ()
  if source is not None:
    hp = source.hyper or hp
    if source.generator is not None:
      g_model, g_vars, g_opt_state, g_tx = source.generator
      models = models._replace(generator=g_model.clone(dtype=dtype))
  # Fresh buffers: the step donates the state, and the student's arrays may be the teacher's.
  g_vars, g_opt_state, s_vars = jax.tree.map(lambda x: jnp.array(x, copy=True),
                                             (g_vars, g_opt_state, s_vars))
  state = jax.device_put(FinetuneState(
      jnp.zeros((), jnp.int32), g_vars, g_opt_state, s_vars,
      s_tx.init(s_vars["params"]), models, g_tx, s_tx, hp),
      parallel.replicated(mesh))

  if source is not None:
    step = source.step or (lambda state, x, tv: kd_step(state, x, tv))
  elif config.adversarial_generator:
    step = functools.partial(dfkd.train_step, mesh=mesh)
  elif config.data_source == "real":
    mean, std = map(tuple, normalization)
    step = lambda state, images, tv: kd_step(state, data.normalize(images, mean, std), tv)
  else:
    step = lambda state, key, tv: kd_step(state, generate(state, key, mesh), tv)
  return state, training.jit_step(step, schedule)


def calibrated(config, name: str, spec, variables, teacher_vars, teacher_meta, source,
               generator):
  """The student's `variables` with the clips that config.calibration gives on the
  calibration images: the image source's (`source`, or stage 1's `generator`) or real ones."""
  methods = calibration.methods_of(spec, config.calibration)
  calibration.announce(name, config, methods)
  key = rng.key(config.seed, rng.CALIBRATION_LATENTS)
  batches = (source.calibration_batches(config, key)
             if source and config.calibration_data == "generated" else
             image_sources.calibration_batches(config, teacher_meta, config.calibration_data,
                                               key, generator))
  summaries = calibration.summarize(teacher_vars, teacher_meta["depth"],
                                    teacher_meta["num_classes"], batches, methods)
  return calibration.calibrate(variables, spec, config.calibration, summaries)


def student_meta(config, name: str, spec, teacher_meta, lineage: dict, total_steps: int,
                 source) -> dict:
  """The stage checkpoint's metadata: the student `name` it holds (under `classifiers`) and
  what it was built from and how."""
  meta = classifiers.classifier_meta(
      teacher_meta["depth"], teacher_meta["dataset"], teacher_meta["mean"], teacher_meta["std"],
      spec, path=["student"], model_name=name, weight_bits=spec.weight_bits,
      act_bits=spec.act_bits, protocol=spec.protocol,
      calibration=config.calibration, calibration_data=config.calibration_data,
      data_source=config.data_source, adversarial_generator=config.adversarial_generator,
      student_bn_train=config.student_bn_train,
      steps=total_steps, batch_size=config.batch_size)
  if source is not None:
    meta["images"] = config.images
  meta.update(total_steps=total_steps, lineage=lineage, seed=config.seed)
  if config.adversarial_generator:
    meta["generator_loss_weights"] = {field: config[field] for field in ADVERSARIAL_FIELDS}
  return {**meta, "classifiers": {name: meta}}


def run(config, workdir: str, sources: dict | None = None) -> None:
  """sources: config.images -> finetune_source(config, workdir, mesh) for the image sources
  other than stage 1's generator (their stages make them; the pipeline composes them)."""
  spec, = validation.quant_specs(config)
  name = stage_name(config, spec)
  stage_dir = os.path.join(workdir, name)
  teacher, teacher_vars, teacher_meta = classifiers.load_stage_teacher(config, workdir)
  generator = source = None
  lineage = {"teacher": teacher_meta[checkpoints.ORIGIN]}
  mesh = parallel.make_mesh()
  if config.images != "dfqf":
    source = sources[config.images](config, workdir, mesh)
    lineage.update(source.lineage)
  elif "generated" in (config.data_source, config.calibration_data):
    *generator, g_meta = image_sources.load_generator(workdir, config.generator_dir)
    lineage["generator"] = g_meta[checkpoints.ORIGIN]
    if config.adversarial_generator:
      config = with_generator_loss_weights(config, g_meta)
  checkpoints.check_lineage(stage_dir, name, lineage, config.on_stale_upstream)
  test_split = data.load_split(teacher_meta["dataset"], "test", data.source(config.data))
  train_split = val_split = data.Split(test_split.images[:0], test_split.labels[:0])
  if config.data_source == "real" or config.data.validation_size > 0:
    train_split, val_split = data.training_splits(config.data, teacher_meta["dataset"],
                                                  config.seed)
  mean, std = teacher_meta["mean"], teacher_meta["std"]

  student, variables = calibration.quantized_student(
      teacher_vars, teacher_meta["depth"], teacher_meta["num_classes"], spec)
  if checkpoints.latest_step(stage_dir) is None:  # a resumed run restores calibrated clips
    variables = calibrated(config, name, spec, variables, teacher_vars, teacher_meta, source,
                           generator)
  total_steps = config.num_epochs * config.steps_per_epoch
  meta = student_meta(config, name, spec, teacher_meta, lineage, total_steps, source)

  state, step_fn = create_state_and_step(
      config, teacher, generator if config.data_source == "generated" else None,
      (student, variables), mesh, (mean, std), source)
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = training.resume(ckpt, stage_dir, state, meta, name)
  teacher_vars = parallel.replicate(mesh, teacher_vars)
  base_key = rng.key(config.seed, rng.FINETUNE_LATENTS)
  rows = parallel.process_slice(config.batch_size)

  def do_step(state, step):
    if source is not None:
      return step_fn(state, source.inputs(step, base_key), teacher_vars)
    if config.data_source == "real":
      batch = data.train_batch(train_split, config.batch_size, config.seed, step, rows,
                               config.data.augment)
      return step_fn(state, parallel.global_batch(mesh, batch)["images"], teacher_vars)
    return step_fn(state, rng.step_key(base_key, step), teacher_vars)

  evaluate = classifiers.top1_evaluator(
      student, lambda state: classifiers.variables_of(state.student),
      {"test": test_split, "val": val_split}, mean, std, mesh, config.steps_per_epoch)
  training.run_steps(name=name, ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=do_step, meta=meta,
                     log_every=config.log_every_steps,
                     loss_keys=("loss_kd", "loss_g", "loss_adv"), evaluate=evaluate,
                     eval_every=config.eval_every_epochs * config.steps_per_epoch,
                     evaluate_start=True)
