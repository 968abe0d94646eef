"""Prepares TFDS's CIFAR-10 or CIFAR-100 from .npz splits, without the network, through TFDS's
own builder and its manual-download path: for a machine that cannot download, and for the
test that reads a real TFDS dataset (tests/test_tfds.py).

  python -m dfqf_jax.tools.prepare_tfds --npz-dir ../shared/data --data-dir DIR \
      [--dataset cifar10] [--manual-dir ARCHIVE_DIR]

Writes the dataset's published binary archive (cifar-10-binary.tar.gz: per image one label
byte, then the 32x32 red, green and blue planes) from {dataset}_train.npz and
{dataset}_test.npz into --manual-dir, then has TFDS's `cifar10` builder prepare it into
--data-dir as array_record files, the format `tfds.data_source` reads without TensorFlow
(`--config.data.dir=tfds --config.data.tfds.data_dir=DIR`). TFDS checks a manually
downloaded archive against the checksum it registered for the published one, which an
archive written from other files (a subset, another compression) cannot match, so the
builder here registers the checksum of the archive it was given; everything else is TFDS's
code. Preparing needs TensorFlow (TFDS encodes each image through it): pip install
tensorflow-cpu. CIFAR-100's fine labels are its `label`; its coarse ones are left 0.
"""
import argparse
import hashlib
import io
import os
import sys
import tarfile
import time

import numpy as np

# dataset -> (archive, its folder, train files, test files, label files)
ARCHIVES = {
    "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"],
                ["batches.meta.txt"]),
    "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-binary", ["train.bin"], ["test.bin"],
                 ["coarse_label_names.txt", "fine_label_names.txt"]),
}


def binary_records(images: np.ndarray, labels: np.ndarray, dataset: str) -> bytes:
  """The published binary format: per image its label byte(s) (CIFAR-100: coarse, fine),
  then its red, green and blue 32x32 planes."""
  planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  label_bytes = labels.astype(np.uint8)[:, None]
  if dataset == "cifar100":
    label_bytes = np.concatenate([np.zeros_like(label_bytes), label_bytes], axis=1)
  return np.concatenate([label_bytes, planes], axis=1).tobytes()


def write_archive(npz_dir: str, dataset: str, manual_dir: str) -> str:
  """Writes the dataset's binary archive from the .npz splits; returns its path."""
  from dfqf_jax import data
  name, folder, train_files, test_files, label_files = ARCHIVES[dataset]
  members = {}
  for split, files in (("train", train_files), ("test", test_files)):
    loaded = data.load_split(dataset, split, npz_dir)
    chunks = np.array_split(np.arange(len(loaded)), len(files))
    for file, rows in zip(files, chunks):
      members[file] = binary_records(loaded.images[rows], loaded.labels[rows], dataset)
  names = "\n".join(data.class_names(dataset)) + "\n"
  for file in label_files:
    members[file] = names.encode() if file != "coarse_label_names.txt" else b"".join(
        f"coarse {i}\n".encode() for i in range(20))
  os.makedirs(manual_dir, exist_ok=True)
  path = os.path.join(manual_dir, name)
  with tarfile.open(path, "w:gz") as tar:
    for file, content in members.items():
      info = tarfile.TarInfo(f"{folder}/{file}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return path


def prepare(archive: str, dataset: str, data_dir: str) -> None:
  """TFDS's builder for `dataset`, preparing it from `archive` (its manual download)."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import checksums
  registered = tfds.builder_cls(dataset)
  digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
  url = next(iter(registered.url_infos))
  given = checksums.UrlInfo(size=os.path.getsize(archive), checksum=digest,
                            filename=os.path.basename(archive))

  class FromLocalArchive(registered, skip_registration=True):
    name = registered.name
    url_infos = {url: given}

  builder = FromLocalArchive(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_dir=os.path.join(data_dir, "downloads"),
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.dirname(archive)))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m dfqf_jax.tools.prepare_tfds",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--npz-dir", required=True, help="folder with {dataset}_{split}.npz")
  parser.add_argument("--data-dir", required=True, help="TFDS data dir to prepare into")
  parser.add_argument("--dataset", default="cifar10", choices=sorted(ARCHIVES))
  parser.add_argument("--manual-dir", default="",
                      help="where the archive is written (default: DATA_DIR/manual)")
  args = parser.parse_args(argv)
  started = time.time()
  archive = write_archive(args.npz_dir, args.dataset,
                          args.manual_dir or os.path.join(args.data_dir, "manual"))
  prepare(archive, args.dataset, args.data_dir)
  print(f"prepared TFDS {args.dataset} in {args.data_dir} from {archive} in "
        f"{time.time() - started:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
