"""The random streams of a run, all derived from config.seed.

Stream `s` of seed `n` is jax.random.key(n * STREAMS_PER_SEED + s): one key per (seed,
stream), none shared between seeds. Until 2026-12-06 it was key(n + s), so seed 1's initial
weights drew from seed 0's stage-1 latent key, seed 1's calibration latents were seed 0's
fine-tuning latents, and so on: runs of nearby seeds were not independent. Seed 0's keys are
the same under both, so seed-0 runs and their checkpoints are unchanged; a checkpoint records
its seed (checkpoints.check_compatible refuses to resume an unrecorded one with seed >= 1).
Each stream has a fixed number: changing one changes every run's numbers (and no longer
resumes old checkpoints exactly), so they are written down once, here.

The host's NumPy draws are seeded from config.seed directly (data.py, image_sources.py):
a training epoch's order `default_rng([seed, epoch])`, its crops and flips
`default_rng([seed, step, 1])`, the real calibration images `default_rng(seed)`. The held-out
split `default_rng([seed, VALIDATION_SPLIT])` has epoch 7's seed; it permutes all training
images and epoch 7 only those kept, so the two orders differ (left as it is: changing it
would change every run's numbers).
"""
import jax
import numpy as np

INIT = 0  # initial weights (teacher, generator, stage-1 student), ZeroQ's initial images
STAGE1_LATENTS = 1  # z of stage-1 (and GDFQ warm-up) iteration i: fold_in(key, i)
GRID_LATENTS = 2  # the generator grid's images (stage 1's and GDFQ's)
CALIBRATION_LATENTS = 3  # generated calibration batches (PTQ and fine-tuning)
FINETUNE_LATENTS = 4  # z of fine-tuning step i: fold_in(key, i)
VALIDATION_SPLIT = 7  # NumPy: which training images are held out (data.train_validation_split)


STREAMS_PER_SEED = 1000  # the block of stream numbers each seed owns (six in use)
# jax.random.key takes its int modulo 2**32 (without x64): the largest seed whose whole block
# of streams stays below 2**32, so that no key wraps around onto another seed's.
MAX_SEED = (2**32 - STREAMS_PER_SEED) // STREAMS_PER_SEED


def key(seed: int, stream: int) -> jax.Array:
  """The key of stream `stream` of the run seeded `seed` (0 <= seed <= MAX_SEED)."""
  return jax.random.key(seed * STREAMS_PER_SEED + stream)


def step_key(base: jax.Array, step: int) -> jax.Array:
  """fold_in(base, step): the key of step `step` of a stream, as one compiled dispatch.

  The training loops derive a key on the host every step; jax.random.fold_in called outside
  jit runs op by op, a few times the host time of the whole rest of the loop
  (experiments/benchmarks/loop_overhead.jsonl), which a fast accelerator step then waits for.
  The step goes in as uint32, the type fold_in hashes, so every step in fold_in's range
  gives fold_in's key (and one compiled program serves them all)."""
  return _fold_in(base, np.uint32(step))


_fold_in = jax.jit(jax.random.fold_in)
