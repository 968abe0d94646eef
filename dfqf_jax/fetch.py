"""First-run downloads: CIFAR-10/100 and the pretrained teachers, verified and cached.

Each source is a URL and its published checksum. A download streams to a temporary file in
the cache folder while its hash is computed; only a verified, converted result is renamed
into place, so an interrupted or corrupted download leaves nothing behind. The cache is
$DFQF_DATA_DIR (default ~/.cache/dfqf_jax): `{name}_{train,test}.npz` as data.py reads them,
and `weights/<pretrained name>.npz` (a state dict, as import_teacher reads it).

$DFQF_SOURCES names a JSON file that replaces sources, e.g. a mirror holding the same files:
{"cifar10": {"url": "https://mirror/cifar-10-python.tar.gz", "md5": "c58f..."}}. The
checksum travels with the URL: a mirror's file must match what it says.
"""
import dataclasses
import hashlib
import http.client
import io
import json
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np

from dfqf_jax import storage, torch_pickle
from dfqf_jax.errors import UserError

CACHE_ENV = "DFQF_DATA_DIR"
SOURCES_ENV = "DFQF_SOURCES"
TIMEOUT_SECONDS = 60


class FetchError(UserError):
  """A download that failed or does not match its checksum; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
  url: str
  md5: str = ""
  sha256: str = ""


# The archives of https://www.cs.toronto.edu/~kriz/cifar.html with the MD5 sums published there.
DATASETS = {
    "cifar10": Source("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      md5="c58f30108f718f92721af3b95e74349a"),
    "cifar100": Source("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       md5="eb9058c3a382ffc7106e4002c42a8d85"),
}


@dataclasses.dataclass(frozen=True)
class Pretrained:
  source: Source
  depth: int
  dataset: str


# akamaster/pytorch_resnet_cifar10's published files (ImageNet mean/std normalization); the
# hash prefix in each file name is the start of its SHA-256.
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
PRETRAINED = {
    "resnet20_cifar10": Pretrained(Source(
        _AKAMASTER + "resnet20-12fca82f.th",
        sha256="12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"), 20, "cifar10"),
    "resnet56_cifar10": Pretrained(Source(
        _AKAMASTER + "resnet56-4bfd9763.th",
        sha256="4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"), 56, "cifar10"),
}


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dfqf_jax")


def source(name: str, default: Source) -> Source:
  """`default`, unless $DFQF_SOURCES replaces the source called `name`."""
  path = os.environ.get(SOURCES_ENV)
  if not path:
    return default
  try:
    with open(path) as f:
      entry = json.load(f).get(name)
    return default if entry is None else Source(**entry)
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise FetchError(f"${SOURCES_ENV}={path!r} is not a JSON object of {{name: {{'url', 'md5' "
                     f"or 'sha256'}}}} ({type(e).__name__}: {e}); fix it or unset it.") from None


def download(src: Source, what: str, local_fix: str) -> bytes:
  """The bytes at src.url, checked against its checksum (a progress bar on stderr).
  `local_fix` says how to use local files instead (ends every error message)."""
  from tqdm import tqdm
  digest = hashlib.md5() if src.md5 else hashlib.sha256()
  expected = src.md5 or src.sha256
  if not expected:
    raise FetchError(f"the source of {what} ({src.url}) has no md5 or sha256; give one.")
  try:
    with urllib.request.urlopen(src.url, timeout=TIMEOUT_SECONDS) as response:
      total = int(response.headers.get("Content-Length") or 0) or None
      body = io.BytesIO()
      with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {what}") as bar:
        while chunk := response.read(1 << 20):
          body.write(chunk)
          digest.update(chunk)
          bar.update(len(chunk))
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    reason = getattr(e, "reason", None) or e
    raise FetchError(f"cannot download {what} from {src.url} ({reason}). Offline? {local_fix}"
                     ) from None
  raw = body.getvalue()
  if total is not None and len(raw) != total:
    raise FetchError(f"the download of {what} from {src.url} stopped after {len(raw):,} of "
                     f"{total:,} bytes (truncated); run again. {local_fix}")
  if digest.hexdigest() != expected:
    raise FetchError(f"{what} from {src.url} has checksum {digest.hexdigest()}, not the "
                     f"published {expected}: the download is corrupted or the file changed. "
                     f"Nothing was kept; run again, or use local files: {local_fix}")
  return raw


def _npz_bytes(arrays: dict) -> bytes:
  out = io.BytesIO()
  np.savez(out, **arrays)
  return out.getvalue()


class _ArraysOnly(pickle.Unpickler):
  """The CIFAR batches are pickled dicts of NumPy arrays, lists and bytes; nothing else runs.
  (_codecs.encode is how Python 3 writes bytes at pickle protocol 2.)"""
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refused {module}.{name} in a CIFAR batch")


def _cifar_members(name: str) -> dict[str, tuple[list[str], bytes]]:
  """split -> (member names in the archive, label key)."""
  if name == "cifar10":
    return {"train": ([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)], b"labels"),
            "test": (["cifar-10-batches-py/test_batch"], b"labels")}
  return {"train": (["cifar-100-python/train"], b"fine_labels"),
          "test": (["cifar-100-python/test"], b"fine_labels")}


def cifar_splits(archive: bytes, name: str, where: str) -> dict[str, dict]:
  """{'train': {'images', 'labels'}, 'test': ...} from the python-version CIFAR archive:
  each batch holds b'data' uint8 [N, 3072] (channel planes, row-major) and its labels."""
  splits = {}
  try:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
      for split, (members, label_key) in _cifar_members(name).items():
        images, labels = [], []
        for member in members:
          batch = _ArraysOnly(tar.extractfile(member), encoding="bytes").load()
          images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
          labels.append(np.asarray(batch[label_key], np.int64))
        splits[split] = {"images": np.concatenate(images).transpose(0, 2, 3, 1),
                         "labels": np.concatenate(labels)}
  except (tarfile.TarError, EOFError, OSError, KeyError, TypeError, ValueError,
          pickle.UnpicklingError, AttributeError) as e:
    raise FetchError(f"{where} is not a readable {name} python archive ({type(e).__name__}: "
                     f"{e}); nothing was kept.") from None
  return splits


def dataset(name: str, folder: str) -> None:
  """Downloads dataset `name` into `folder` as {name}_{train,test}.npz (both, or neither)."""
  local_fix = (f"Point --config.data.dir at a folder holding {name}_train.npz and "
               f"{name}_test.npz (e.g. ../shared/data).")
  src = source(name, DATASETS[name])
  splits = cifar_splits(download(src, name, local_fix), name, src.url)
  for split, arrays in splits.items():
    storage.write_atomically(os.path.join(folder, f"{name}_{split}.npz"), _npz_bytes(arrays))
  print(f"data: {name} downloaded from {src.url}, verified and converted into {folder}")


def pretrained(name: str) -> str:
  """The cached state dict (.npz) of pretrained teacher `name`, downloaded on first use."""
  if name not in PRETRAINED:
    raise FetchError(f"no pretrained teacher is called {name!r}; use one of "
                     f"{sorted(PRETRAINED)}, or the path of a .npz/.th/.pt state dict.")
  path = os.path.join(cache_dir(), "weights", f"{name}.npz")
  if not storage.isfile(path):
    src = source(name, PRETRAINED[name].source)
    raw = download(src, name, "Give the weights file's path instead (the pipeline's "
                   "--config.teacher_weights, import_teacher's --config.weights), e.g. "
                   "../shared/data/resnet20-12fca82f_weights.npz.")
    tensors = torch_pickle.state_dict(torch_pickle.load(raw, src.url), src.url)
    storage.write_atomically(path, _npz_bytes(tensors))
    print(f"teacher: {name} downloaded from {src.url}, verified and converted into {path}")
  return path
