"""CIFAR-10/100 input: a folder of NumPy files, downloaded on first use, or TFDS.

The folder holds `{name}_train.npz` / `{name}_test.npz` with `images` uint8 [N, 32, 32, 3]
and `labels`. It is config.data.dir when set (used as is, never downloaded into); otherwise
the cache $DFQF_DATA_DIR (default ~/.cache/dfqf_jax), where a missing dataset is downloaded
from its published archive, verified and converted (fetch.py).

data.dir=tfds reads a prepared TFDS dataset instead (`Tfds`: config.data.tfds.dataset, e.g.
'cifar10' or 'cifar100:3.0.2', default data.name; config.data.tfds.data_dir, local or gs://,
default TFDS's ~/tensorflow_datasets) through `tfds.data_source`: array_record files, read
without TensorFlow. Preparing it needs TensorFlow (`tfds build cifar10 --file_format
array_record`, or dfqf_jax.tools.prepare_tfds from local .npz files); a TFRecord-only
preparation is refused with that fix (tfds.load would need TensorFlow at run time).

The whole split stays in host memory. Training batches are a deterministic function of
(seed, step): a per-epoch permutation, then random crop (4-pixel zero padding) and
horizontal flip drawn for the whole global batch, so the data order and augmentation do not
depend on the number of devices or processes, and a resumed run sees exactly the batches
it would have seen.
"""
import dataclasses
import hashlib
import os
import zipfile

import numpy as np

from dfqf_jax import fetch, rng, storage
from dfqf_jax.errors import UserError, brief

DATASETS = {"cifar10": 10, "cifar100": 100}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_DIR_ENV = fetch.CACHE_ENV
TFDS = "tfds"  # data.dir value that selects TFDS


class DataError(UserError, ValueError):
  """Input data that cannot be used; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8 [N, 32, 32, 3]
  labels: np.ndarray  # int32 [N]

  def __len__(self):
    return len(self.labels)


def num_classes(name: str) -> int:
  if name not in DATASETS:
    raise DataError(f"data.name={name!r} is not supported; use one of {sorted(DATASETS)}.")
  return DATASETS[name]


def class_names(name: str) -> tuple[str, ...]:
  return CIFAR10_CLASSES if name == "cifar10" else tuple(
      f"class {i}" for i in range(num_classes(name)))


@dataclasses.dataclass(frozen=True)
class Tfds:
  """A prepared TFDS dataset (data.dir=tfds): its TFDS name ('' = data.name; 'name:version'
  pins a version) and TFDS data dir ('' = TFDS's default; local or gs://)."""
  dataset: str = ""
  data_dir: str = ""


def source(data_config) -> "str | Tfds":
  """What config.data says to read: a folder of .npz files ('' = the download cache), or a
  `Tfds` when data.dir is 'tfds'."""
  if data_config.dir != TFDS:
    return data_config.dir
  tfds_config = data_config.get("tfds") or {}
  return Tfds(tfds_config.get("dataset", ""), tfds_config.get("data_dir", ""))


def resolve_dir(configured: "str | Tfds | None") -> "str | Tfds":
  """The folder (or TFDS dataset) a run reads: data.dir when set, else the download cache."""
  if configured == TFDS:
    return Tfds()
  return configured or fetch.cache_dir()


def load_split(name: str, split: str, data_dir: "str | Tfds | None") -> Split:
  """Loads `split` ('train' or 'test') of dataset `name` into memory from `data_dir` (see
  `source`), checked: uint8 images [N, 32, 32, 3], one integer label per image, each in
  [0, num_classes)."""
  num_classes(name)  # an unknown dataset is named before any file is looked for
  folder = resolve_dir(data_dir)
  if isinstance(folder, Tfds):
    loaded = _load_tfds(folder.dataset or name, split, folder.data_dir)
    where = f"TFDS {folder.dataset or name}:{split}"
  else:
    where = os.path.join(folder, f"{name}_{split}.npz")
    if not data_dir and not storage.isfile(where):
      fetch.dataset(name, folder)
    loaded = _load_npz(name, split, folder)
  _check_label_range(loaded.labels, name, where)
  return loaded


def _check_label_range(labels: np.ndarray, name: str, where: str) -> None:
  classes = num_classes(name)
  if labels.size and (labels.min() < 0 or labels.max() >= classes):
    raise DataError(f"{where}: labels range over [{labels.min()}, {labels.max()}], but {name} "
                    f"has {classes} classes (labels 0..{classes - 1}); fix the file or choose "
                    "the matching data.name.")


def check_labels(name: str, split: str, data_dir: str | None) -> None:
  """Before any work: the labels of an existing .npz split are integers in [0, num_classes)
  (read alone: the images are checked when the split is loaded)."""
  folder = resolve_dir(data_dir)
  if isinstance(folder, Tfds):
    return check_tfds(name, folder)
  path = os.path.join(folder, f"{name}_{split}.npz")
  if not storage.isfile(path):
    return  # a missing download-cache file is fetched later
  labels = read_npz(path, f"Replace it with a valid {name}_{split}.npz.", ("labels",)).get(
      "labels")
  if labels is not None and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
    _check_label_range(labels, name, path)


def fingerprint(split: Split) -> str:
  """A short hash of a split's images and labels (what decides an evaluation's number)."""
  digest = hashlib.sha256(np.ascontiguousarray(split.images).tobytes())
  digest.update(np.ascontiguousarray(split.labels, np.int64).tobytes())
  return digest.hexdigest()[:16]


def read_npz(path: str, fix: str, keys=None) -> dict:
  """The arrays of an .npz file (those of `keys` it holds, if given), or one DataError naming
  the file, the problem and `fix`: not a readable archive (truncated, not a zip), or arrays
  that need pickle (refused)."""
  try:
    with storage.open_file(path, "rb") as file, np.load(file, allow_pickle=False) as f:
      return {k: f[k] for k in f.files if keys is None or k in keys}
  except ValueError as e:  # object arrays would need pickle
    raise DataError(f"{path} holds arrays that need pickle ({e}); save plain numeric arrays "
                    f"with numpy.savez. {fix}") from None
  except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise DataError(f"{path} is not a readable .npz archive ({type(e).__name__}: {e}); it is "
                    f"truncated or not an .npz file. {fix}") from None


def _load_npz(name: str, split: str, data_dir: str) -> Split:
  path = os.path.join(data_dir, f"{name}_{split}.npz")
  if not storage.isfile(path):
    raise DataError(
        f"data.dir={data_dir!r} has no {name}_{split}.npz; point data.dir at a folder holding "
        f"{name}_train.npz and {name}_test.npz with 'images' and 'labels' (or leave it empty to "
        f"download them into ${DATA_DIR_ENV}).")
  arrays = read_npz(path, f"Replace it with a valid {name}_{split}.npz.")
  missing = {"images", "labels"} - set(arrays)
  if missing:
    raise DataError(f"{path} lacks the arrays {sorted(missing)}; it needs 'images' uint8 "
                    "[N, 32, 32, 3] and 'labels'.")
  images, labels = arrays["images"], arrays["labels"]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
    raise DataError(f"{path}: 'images' is {images.dtype} {images.shape}; expected uint8 "
                    "[N, 32, 32, 3].")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{path}: 'labels' is {labels.dtype} {labels.shape}; expected integers [N].")
  if len(labels) != len(images):
    raise DataError(f"{path}: {len(images)} images but {len(labels)} labels.")
  return Split(images, labels.astype(np.int32))


def _tfds_builder(dataset: str, data_dir: str):
  """TFDS's builder of a prepared `dataset` in `data_dir`, or one DataError with the fix."""
  import tensorflow_datasets as tfds
  where = data_dir or "TFDS's default data dir (~/tensorflow_datasets)"
  prepare = (f"prepare it with TensorFlow installed (tfds build {dataset.split(':')[0]} "
             f"--data_dir {data_dir or '~/tensorflow_datasets'} --file_format array_record, or "
             "python -m dfqf_jax.tools.prepare_tfds from local .npz files)")
  try:
    builder = tfds.builder(dataset, data_dir=data_dir or None)
  except Exception as e:  # TFDS raises many types for unknown names and unreadable folders
    raise DataError(f"TFDS has no dataset {dataset!r} in {where} ({brief(e)}); {prepare}, or "
                    "set config.data.tfds.dataset/data_dir to where it is.") from None
  if not builder.is_prepared():
    raise DataError(f"TFDS {dataset!r} is not prepared in {where}; {prepare}.")
  formats = {builder.info.file_format.value} | set(
      f.value for f in getattr(builder.info, "alternative_file_formats", []))
  if "array_record" not in formats:
    raise DataError(f"TFDS {dataset!r} in {where} is prepared as {sorted(formats)}, which "
                    f"needs TensorFlow to read; {prepare}.")
  return builder


def check_tfds(name: str, source_: Tfds) -> None:
  """A prepared TFDS dataset whose labels are those of data.name."""
  dataset = source_.dataset or name
  label = _tfds_builder(dataset, source_.data_dir).info.features["label"]
  if label.num_classes != num_classes(name):
    raise DataError(f"TFDS {dataset!r} has {label.num_classes} classes but data.name={name!r} "
                    f"has {num_classes(name)}; set config.data.tfds.dataset to a {name} "
                    "dataset or choose the matching data.name.")


def _load_tfds(dataset: str, split: str, data_dir: str) -> Split:
  """A split of a prepared TFDS dataset, read through tfds.data_source (no TensorFlow)."""
  _tfds_builder(dataset, data_dir)
  import tensorflow_datasets as tfds
  try:
    records = tfds.data_source(dataset, split=split, data_dir=data_dir or None)
    records = records.__getitems__(list(range(len(records))))
  except Exception as e:  # TFDS raises many types when the files cannot be read
    raise DataError(f"TFDS could not read {dataset}/{split} ({brief(e)}); prepare it again "
                    "(see dfqf_jax/data.py).") from None
  images = np.stack([r["image"] for r in records]).astype(np.uint8)
  labels = np.asarray([r["label"] for r in records], np.int32)
  return Split(images, labels)


def train_validation_split(train: Split, validation_size: int, seed: int) -> tuple[Split, Split]:
  """Holds out `validation_size` training images (fixed by seed) for model selection."""
  if validation_size <= 0:
    return train, Split(train.images[:0], train.labels[:0])
  order = np.random.default_rng([seed, rng.VALIDATION_SPLIT]).permutation(len(train))
  held, kept = np.sort(order[:validation_size]), np.sort(order[validation_size:])
  return (Split(train.images[kept], train.labels[kept]),
          Split(train.images[held], train.labels[held]))


def training_splits(data_config, dataset: str, seed: int) -> tuple[Split, Split]:
  """(the training images a stage trains on, the data.validation_size held out) of
  `dataset`, read as config.data says (train_validation_split)."""
  train = load_split(dataset, "train", source(data_config))
  return train_validation_split(train, data_config.validation_size, seed)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped)."""
  return num_examples // batch_size


def train_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of global batch `step`: a fresh permutation every epoch."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * batch_size:(position + 1) * batch_size]


def augment(images: np.ndarray, random: np.random.Generator, padding: int = 4) -> np.ndarray:
  """Random crop with zero padding + random horizontal flip, per image (uint8 NHWC)."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy = random.integers(0, 2 * padding + 1, n)
  dx = random.integers(0, 2 * padding + 1, n)
  flip = random.random(n) < 0.5
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train_batch(split: Split, batch_size: int, seed: int, step: int, rows: slice,
                augmentation: bool = True) -> dict:
  """Rows `rows` of global training batch `step` (uint8 images, int32 labels)."""
  idx = train_batch_indices(len(split), batch_size, seed, step)
  images = split.images[idx]
  if augmentation:
    images = augment(images, np.random.default_rng([seed, step, 1]))
  return {"images": images[rows], "labels": split.labels[idx][rows]}


def normalize(images_uint8, mean, std):
  """uint8 NHWC -> float32 normalized with per-channel mean/std (works on jax arrays)."""
  import jax.numpy as jnp
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
