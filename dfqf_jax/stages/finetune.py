"""Stage 2: calibrate the quantized student, then fine-tune it by KD on generated images.

Each step draws fresh images x = G(z) (G's BNs in training mode), and the quantized student
S_q (BNs in training mode, so their running statistics adapt to generated data) descends
KL(softmax(T(x)) || softmax(S_q(x))) with T in inference mode. Weights use SGD (momentum
0.9, weight decay 5e-4, lr 0.001); clip values plain SGD at lr 0.0001.

Options: `adversarial_generator=True` keeps updating G with the stage-1 generator loss
against S_q (the stage-1 step is reused); `data='real'` replaces generated images with
augmented real training images (the real-data QAT bound, labels unused).
"""
import os

import jax
import jax.numpy as jnp
import optax

from dfqf_jax import calibration, checkpoints, data, parallel, training
from dfqf_jax import losses as L
from dfqf_jax import quant as q
from dfqf_jax.models.generator import sample_latent
from dfqf_jax.stages import common, ptq
from dfqf_jax.stages import generator as stage1
from dfqf_jax.stages.generator import GeneratorState as FinetuneState


def stage_name(config, w: int, a: int) -> str:
  name = "qat_real" if config.data_source == "real" else "student"
  name += f"_w{w}a{a}"
  return name if config.protocol == "dfqf" else f"{name}_{config.protocol}"


def student_optimizer(config, steps_per_epoch: int):
  """SGD with momentum and weight decay for weights; plain SGD for clip values."""
  schedule = training.step_decay(config.learning_rate, config.lr_milestones, steps_per_epoch)
  label = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "clip" if path[-1].key in (calibration.WEIGHT_CLIP, calibration.ACT_CLIP)
      else "weight", params)
  tx = optax.multi_transform(
      {"weight": training.sgd(schedule, config.momentum, config.weight_decay),
       "clip": optax.sgd(config.clip_learning_rate)}, label)
  return tx, schedule


def kd_step(generator, teacher, student, s_tx, batch_size: int, latent_dim: int, mesh,
            bn_train: bool, state: FinetuneState, teacher_vars, key, real_images=None):
  """One KD step on fresh generated images (or on `real_images`).

  bn_train: the student's BNs normalize with batch statistics and update their running
  statistics (the reference); False keeps the teacher's running statistics frozen.
  """
  if real_images is None:
    z = jax.lax.with_sharding_constraint(sample_latent(key, batch_size, latent_dim),
                                         parallel.batch_sharding(mesh))
    x, _ = generator.apply(state.generator, z, train=True, mutable=["batch_stats"])
  else:
    x = real_images
  t = teacher.apply(teacher_vars, x, train=False)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.student["batch_stats"]}
    if bn_train:
      s, updates = student.apply(variables, x, train=True, mutable=["batch_stats"])
      return L.kd_loss(t, s), (s, updates["batch_stats"])
    s = student.apply(variables, x, train=False)
    return L.kd_loss(t, s), (s, state.student["batch_stats"])

  (loss, (s, s_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.student["params"])
  updates, s_opt_state = s_tx.update(grads, state.s_opt_state, state.student["params"])
  student_state = {"params": optax.apply_updates(state.student["params"], updates),
                   "batch_stats": s_stats}
  agreement = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).mean()
  return state.replace(step=state.step + 1, student=student_state, s_opt_state=s_opt_state), {
      "loss_kd": loss, "teacher_agreement": agreement}


def jitted_step(config, generator, teacher, student, g_tx, s_tx, schedule, latent_dim: int,
                mesh, mean, std):
  """The stage's step as run() dispatches it, jitted with the state donated: a KD step on
  generated images (or on a real uint8 batch, normalized inside the step), or with
  `adversarial_generator` a stage-1 iteration against the quantized student; plus the
  learning rate, logged from inside the step."""
  if config.adversarial_generator:
    hp = stage1.Hyper(config.batch_size, latent_dim, config.lambda_is, config.lambda_bn,
                      config.lambda_adv)
    one_step = lambda s, tv, k, _: stage1.train_step(generator, teacher, student, g_tx, s_tx,
                                                     hp, s, tv, k, mesh)
  else:
    one_step = lambda s, tv, k, x: kd_step(generator, teacher, student, s_tx, config.batch_size,
                                           latent_dim, mesh, config.student_bn_train, s, tv, k,
                                           x)

  def step(state, teacher_vars, key, real_uint8):
    real_images = None if real_uint8 is None else data.normalize(real_uint8, mean, std)
    return one_step(state, teacher_vars, key, real_images)

  return training.jit_step(step, schedule)


def run(config, workdir: str) -> None:
  (w, a), = ptq.parse_bits(config.bits)
  name = stage_name(config, w, a)
  stage_dir = os.path.join(workdir, name)
  teacher, teacher_vars, teacher_meta = common.load_teacher(workdir, config.teacher_dir)
  common.check_teacher_depth(config, teacher_meta)
  generator, g_vars = None, {}
  lineage = {"teacher": teacher_meta[checkpoints.ORIGIN]}
  if "generated" in (config.data_source, config.calibration_data) or config.adversarial_generator:
    generator, g_vars, g_meta = stage1.load_generator(workdir, config.generator_dir)
    lineage["generator"] = g_meta[checkpoints.ORIGIN]
  checkpoints.check_lineage(stage_dir, name, lineage, config.on_stale_upstream)
  mesh = parallel.make_mesh()
  test_split = data.load_split(teacher_meta["dataset"], "test", config.data.dir)
  train_split = val_split = data.Split(test_split.images[:0], test_split.labels[:0])
  if config.data_source == "real" or config.data.validation_size > 0:
    train_split, val_split = data.train_validation_split(
        data.load_split(teacher_meta["dataset"], "train", config.data.dir),
        config.data.validation_size, config.seed)
  mean, std = teacher_meta["mean"], teacher_meta["std"]

  spec = q.QuantSpec(w, a, config.protocol)
  student, variables = calibration.quantized_student(
      teacher_vars, teacher_meta["depth"], teacher_meta["num_classes"], spec)
  if checkpoints.latest_step(stage_dir) is None:  # a resumed run restores calibrated clips
    batches = ptq.calibration_batches(config, teacher_meta, config.calibration_data,
                                      jax.random.key(config.seed + 3), (generator, g_vars))
    summaries = ptq.summarize(teacher_vars, teacher_meta, batches, [config.calibration])
    variables = calibration.calibrate(variables, spec, config.calibration, summaries)
  s_tx, schedule = student_optimizer(config, config.steps_per_epoch)
  g_tx = optax.adam(config.generator_learning_rate)
  total_steps = config.num_epochs * config.steps_per_epoch
  meta = common.classifier_meta(
      teacher_meta["depth"], teacher_meta["dataset"], mean, std, spec, path=["student"],
      model_name=name, weight_bits=w, act_bits=a, protocol=config.protocol,
      calibration=config.calibration, calibration_data=config.calibration_data,
      data_source=config.data_source, adversarial_generator=config.adversarial_generator,
      student_bn_train=config.student_bn_train,
      steps=total_steps, batch_size=config.batch_size)
  meta.update(total_steps=total_steps, lineage=lineage)
  meta = {**meta, "classifiers": {name: meta}}

  replicated = parallel.replicated(mesh)
  state = jax.device_put(FinetuneState(
      jnp.zeros((), jnp.int32), jax.tree.map(jnp.asarray, g_vars),
      g_tx.init(g_vars.get("params", {})), variables, s_tx.init(variables["params"])),
      replicated)
  teacher_vars = parallel.replicate(mesh, teacher_vars)
  ckpt = checkpoints.manager(stage_dir, config.checkpoint_every_steps)
  state, start = checkpoints.resume(ckpt, stage_dir, state, meta)
  if start:
    print(f"{name}: resuming from step {start}")

  latent_dim = generator.latent_dim if generator else 0
  dtype = common.compute_dtype(config)  # the step's models; evaluation stays float32
  t_model, s_model = teacher.clone(dtype=dtype), student.clone(dtype=dtype)
  g_model = generator.clone(dtype=dtype) if generator else None
  step_fn = jitted_step(config, g_model, t_model, s_model, g_tx, s_tx, schedule, latent_dim,
                        mesh, mean, std)
  base_key = jax.random.key(config.seed + 4)
  rows = parallel.process_slice(config.batch_size)

  def do_step(state, step):
    real = None
    if config.data_source == "real":
      batch = data.train_batch(train_split, config.batch_size, config.seed, step, rows)
      real = parallel.global_batch(mesh, batch)["images"]
    return step_fn(state, teacher_vars, jax.random.fold_in(base_key, step), real)

  def evaluate(state, step):
    s_vars = common.variables_of(state.student)
    result = {"epoch": step / config.steps_per_epoch,
              "test_top1": common.top1(student, s_vars, test_split, mean, std, mesh)}
    if len(val_split):
      result["val_top1"] = common.top1(student, s_vars, val_split, mean, std, mesh)
    return result

  training.run_steps(name=name, ckpt=ckpt, state=state, start_step=start,
                     total_steps=total_steps, train_step=do_step, meta=meta,
                     log_every=config.log_every_steps,
                     loss_keys=("loss_kd", "loss_g", "loss_adv"), evaluate=evaluate,
                     eval_every=config.eval_every_epochs * config.steps_per_epoch,
                     evaluate_start=True)
