"""The project's own jitted steps, built for timing the way each stage's run() builds them.

Each builder returns a `Step`: the step the stage's `create_state_and_step` builds (the
function its run() dispatches, state donated) and its arguments, placed on a mesh of all
devices (state and teacher replicated, batches sharded along `data`).

Weights are random (or, for the quantized student, the random teacher's weights with clips
calibrated on generated images as stage 2 does): speed does not depend on their values.
Inputs are random uint8 images already on the devices; host-side loading and augmentation
are not part of any step.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from configs import evaluate as evaluate_config
from configs import finetune as finetune_config
from configs import generator as generator_config
from configs import teacher as teacher_config
from dfqf_jax import calibration, classifiers, data, parallel, rng
from dfqf_jax import quant as q
from dfqf_jax.models.generator import sample_latent
from dfqf_jax.models.resnet import CifarResNet
from dfqf_jax.stages import finetune, ptq
from dfqf_jax.stages import generator as stage1
from dfqf_jax.stages import teacher as stage0

CIFAR_TRAIN_SIZE = 50_000
CALIBRATION_BATCH = 32  # generated images for the stage-2 clips (values only, not timed)


@dataclasses.dataclass
class Step:
  """fn(*args) is one step; with `carries_state`, output[0] replaces args[0] (donated)."""
  fn: object
  args: tuple
  carries_state: bool

  def run(self, count: int = 1) -> None:
    """`count` steps dispatched back to back, then waited for once."""
    out = None
    for _ in range(count):
      out = self.fn(*self.args)
      if self.carries_state:
        self.args = (out[0],) + self.args[1:]
    jax.block_until_ready(out)


def _random_images(batch: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"images": rng.integers(0, 256, (batch, 32, 32, 3), np.uint8),
          "labels": rng.integers(0, 10, batch).astype(np.int32)}


def _classifier(config, dtype, **kwargs) -> CifarResNet:
  return CifarResNet(config.model.depth, data.num_classes(config.data.name), dtype=dtype,
                     **kwargs)


def _random_variables(model, mesh, seed: int = 0) -> dict:
  """params and batch_stats only, as a loaded checkpoint has them (init also fills the
  `bn_input_stats` collection, which would then collect twice)."""
  init = jax.jit(
      lambda key: classifiers.variables_of(model.init(key, jnp.zeros((1, 32, 32, 3)))),
      out_shardings=parallel.replicated(mesh))
  return init(jax.random.key(seed))


def teacher_step(batch: int, dtype, mesh, depth: int) -> Step:
  """stages/teacher.py: SGD step on a real-shaped uint8 batch, normalized in the step."""
  config = teacher_config.get_config()
  config.compute_dtype, config.model.depth = dtype.name, depth
  state, step = stage0.create_state_and_step(
      config, data.steps_per_epoch(CIFAR_TRAIN_SIZE, batch), mesh)
  rows = parallel.process_slice(batch)
  images = parallel.global_batch(
      mesh, {k: v[rows] for k, v in _random_images(batch).items()})
  return Step(step, (state, images), True)


def generator_step(batch: int, dtype, mesh, depth: int, student_passes: int,
                   generator_schedule: str) -> Step:
  """stages/generator.py: one stage-1 iteration (G Adam step + student SGD step).

  student_passes=1 is the project's default (one backward pass gives both gradients);
  2 runs the student a second time on detached images, as the reference code does.
  """
  config = generator_config.get_config(generator_schedule)
  config.batch_size, config.compute_dtype, config.model.depth = batch, dtype.name, depth
  config.single_student_pass = student_passes == 1
  teacher = _classifier(config, jnp.float32)
  state, step = stage1.create_state_and_step(config, teacher, mesh)
  teacher_vars = _random_variables(teacher, mesh)
  return Step(step, (state, rng.key(config.seed, rng.STAGE1_LATENTS), teacher_vars), True)


def _calibrated_student(config, teacher_vars, generator, g_vars):
  """stage 2's quantized student: the teacher's weights, clips calibrated on generated
  images by the configured rule (stages/finetune.py run())."""
  (w, a), = q.parse_bits(config.bits)
  spec = q.QuantSpec(w, a, config.protocol)
  teacher_meta = {"depth": config.model.depth, "num_classes": data.num_classes(config.data.name)}
  teacher_vars = jax.device_get(teacher_vars)
  z = sample_latent(rng.key(config.seed, rng.CALIBRATION_LATENTS), CALIBRATION_BATCH,
                    generator.latent_dim)
  images = jax.jit(lambda v, z: generator.apply(v, z, train=True, mutable=["batch_stats"])[0]
                   )(g_vars, z)
  summaries = calibration.summarize(teacher_vars, teacher_meta["depth"],
                                    teacher_meta["num_classes"], [images], [config.calibration])
  return ptq.quantize_and_calibrate(teacher_vars, teacher_meta, spec, config.calibration,
                                    summaries)


def finetune_step(batch: int, dtype, mesh, depth: int, generator_schedule: str) -> Step:
  """stages/finetune.py: one KD step of the W4A4 student on fresh generated images."""
  config = finetune_config.get_config("w4a4")
  config.batch_size, config.compute_dtype, config.model.depth = batch, dtype.name, depth
  teacher = _classifier(config, jnp.float32)
  generator = stage1.make_generator(generator_config.get_config(generator_schedule))
  teacher_vars = _random_variables(teacher, mesh)
  g_vars = jax.jit(lambda key: classifiers.variables_of(
      generator.init(key, jnp.zeros((2, generator.latent_dim)))))(jax.random.key(1))
  student = _calibrated_student(config, teacher_vars, generator, g_vars)
  state, step = finetune.create_state_and_step(config, teacher, (generator, g_vars), student,
                                               mesh)
  return Step(step, (state, rng.key(config.seed, rng.FINETUNE_LATENTS), teacher_vars), True)


def evaluate_step(batch: int, dtype, mesh, depth: int) -> Step:
  """classifiers.py `count_correct`: one evaluation batch of `top1_percent()`."""
  config = evaluate_config.get_config()
  config.model.depth = depth
  model = _classifier(config, dtype)
  variables = _random_variables(model, mesh)
  rows = parallel.process_slice(batch)
  inputs = _random_images(batch)
  inputs["valid"] = np.ones(batch, bool)
  inputs = parallel.global_batch(mesh, {k: v[rows] for k, v in inputs.items()})
  return Step(classifiers.count_correct,
              (model, variables, inputs["images"], inputs["labels"], inputs["valid"],
               data.CIFAR_MEAN, data.CIFAR_STD), False)


def build(stage: str, batch: int, dtype: str, student_passes: int, depth: int = 20,
          generator_schedule: str = "reference") -> Step:
  """The stage's step for a ResNet-`depth` and the generator of configs/generator.py's
  `generator_schedule` (the benchmark's rows are ResNet-20's with the reference generator)."""
  parallel.use_cpu_cores()  # the devices main.py would use
  mesh = parallel.make_mesh()
  if batch % jax.device_count():
    raise ValueError(f"--{stage}-batch={batch} is not divisible by the {jax.device_count()} "
                     f"devices; use a multiple of {jax.device_count()}.")
  dtype = jnp.dtype(dtype)
  if stage == "generator":
    return generator_step(batch, dtype, mesh, depth, student_passes, generator_schedule)
  if stage == "finetune":
    return finetune_step(batch, dtype, mesh, depth, generator_schedule)
  return {"teacher": teacher_step, "evaluate": evaluate_step}[stage](batch, dtype, mesh, depth)
