"""The random streams: one key per (seed, stream), seed 0's as they always were, and a step's
key does not depend on how it is computed."""
import jax
import numpy as np

from dfqf_jax import rng

STREAMS = (rng.INIT, rng.STAGE1_LATENTS, rng.GRID_LATENTS, rng.CALIBRATION_LATENTS,
           rng.FINETUNE_LATENTS)


def key_bits(seed: int, stream: int) -> tuple:
  return tuple(np.asarray(jax.random.key_data(rng.key(seed, stream))).tolist())


def test_no_two_seeds_share_a_stream():
  """Seed s + 1's initial weights are not seed s's stage-1 latents (as with key(seed +
  stream)), nor any other pair, up to the largest seed config validation lets through."""
  seeds = (0, 1, 2, 3, 4, 5, 999, 1000, rng.MAX_SEED)
  keys = [key_bits(seed, stream) for seed in seeds for stream in STREAMS]
  assert len(set(keys)) == len(keys)


def test_the_largest_seed_is_the_last_whose_streams_do_not_wrap_around_2_to_the_32():
  """jax.random.key takes its int modulo 2**32: one seed past MAX_SEED, some of its block of
  streams would be seed 0's keys."""
  last_key = lambda seed: seed * rng.STREAMS_PER_SEED + rng.STREAMS_PER_SEED - 1
  assert last_key(rng.MAX_SEED) < 2**32 <= last_key(rng.MAX_SEED + 1)
  wrapped = (rng.MAX_SEED + 1) * rng.STREAMS_PER_SEED + rng.STREAMS_PER_SEED - 1 - 2**32
  assert key_bits(rng.MAX_SEED + 1, rng.STREAMS_PER_SEED - 1) == key_bits(0, wrapped)


def test_seed_0_keeps_the_keys_of_every_run_before_seeds_were_separated():
  for stream in STREAMS:
    assert key_bits(0, stream) == tuple(
        np.asarray(jax.random.key_data(jax.random.key(stream))).tolist())


def test_a_step_key_is_fold_in_of_the_stream_key():
  """Runs and checkpoints made before step_key was compiled resume onto the same latents."""
  base = rng.key(3, rng.FINETUNE_LATENTS)
  for step in (0, 1, 999, 24_000, 2**31, 2**32 - 1):
    np.testing.assert_array_equal(jax.random.key_data(rng.step_key(base, step)),
                                  jax.random.key_data(jax.random.fold_in(base, step)))
