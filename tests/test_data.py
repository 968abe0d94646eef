"""Input pipeline: deterministic shuffled batches, augmentation, splits, offline loading."""
import numpy as np
import pytest

from dfqf_jax import data


def make_split(n=40):
  rng = np.random.default_rng(0)
  return data.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    np.sort(rng.integers(0, 10, n)).astype(np.int32))


def test_each_epoch_is_a_permutation_and_batches_are_deterministic():
  seen = np.concatenate([data.train_batch_indices(40, 8, 0, s) for s in range(5)])
  assert sorted(seen) == list(range(40))
  np.testing.assert_array_equal(data.train_batch_indices(40, 8, 0, 7),
                                data.train_batch_indices(40, 8, 0, 7))
  assert not np.array_equal(data.train_batch_indices(40, 8, 0, 0),
                            data.train_batch_indices(40, 8, 0, 5))


def test_process_rows_concatenate_to_the_global_batch():
  split = make_split()
  full = data.train_batch(split, 8, 0, 3, slice(None))
  halves = [data.train_batch(split, 8, 0, 3, slice(i * 4, i * 4 + 4)) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["images"] for h in halves]), full["images"])


def test_augment_is_a_padded_crop_or_its_mirror():
  rng = np.random.default_rng(1)
  images = rng.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
  out = data.augment(images, np.random.default_rng(2))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(64):
    candidates = [padded[i, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.array_equal(out[i], c) for c in candidates)
  assert (out == 0).any()  # some crops reach into the zero padding


def test_validation_split_is_held_out_of_training():
  split = make_split(100)
  train, val = data.train_validation_split(split, 10, seed=0)
  assert len(train) == 90 and len(val) == 10


def test_missing_local_files_give_one_clear_error(tmp_path):
  with pytest.raises(data.DataError, match="has no cifar10_train.npz"):
    data.load_split("cifar10", "train", str(tmp_path))
  with pytest.raises(data.DataError, match="not supported"):
    data.load_split("mnist", "train", str(tmp_path))
