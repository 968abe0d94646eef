"""The random streams of a run, all derived from config.seed.

Each stream has a fixed offset: changing one changes every run's numbers (and no longer
resumes old checkpoints exactly), so they are written down once, here.
"""
import jax
import numpy as np

INIT = 0  # initial weights (teacher, generator, stage-1 student)
STAGE1_LATENTS = 1  # z of stage-1 iteration i: fold_in(key, i)
GRID_LATENTS = 2  # the generator grid's images
CALIBRATION_LATENTS = 3  # generated calibration batches (PTQ and fine-tuning)
FINETUNE_LATENTS = 4  # z of fine-tuning step i: fold_in(key, i)
VALIDATION_SPLIT = 7  # NumPy: which training images are held out (data.train_validation_split)


def key(seed: int, stream: int) -> jax.Array:
  return jax.random.key(seed + stream)


def step_key(base: jax.Array, step: int) -> jax.Array:
  """fold_in(base, step): the key of step `step` of a stream, as one compiled dispatch.

  The training loops derive a key on the host every step; jax.random.fold_in called outside
  jit runs op by op, a few times the host time of the whole rest of the loop
  (experiments/benchmarks/loop_overhead.jsonl), which a fast accelerator step then waits for.
  The step goes in as uint32, the type fold_in hashes, so every step in fold_in's range
  gives fold_in's key (and one compiled program serves them all)."""
  return _fold_in(base, np.uint32(step))


_fold_in = jax.jit(jax.random.fold_in)
