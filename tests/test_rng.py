"""The random streams: a step's key does not depend on how it is computed."""
import jax
import numpy as np

from dfqf_jax import rng


def test_a_step_key_is_fold_in_of_the_stream_key():
  """Runs and checkpoints made before step_key was compiled resume onto the same latents."""
  base = rng.key(3, rng.FINETUNE_LATENTS)
  for step in (0, 1, 999, 24_000, 2**31, 2**32 - 1):
    np.testing.assert_array_equal(jax.random.key_data(rng.step_key(base, step)),
                                  jax.random.key_data(jax.random.fold_in(base, step)))
